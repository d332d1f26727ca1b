"""shared.model: config validation, shapes, loss, KV cache, parameter and FLOP counts.

References: known parameter counts of GPT-2 small and Llama-2-7B, PyTorch's nn.RMSNorm,
FLOPs counted by `torch.utils.flop_counter`, and Hugging Face's LlamaForCausalLM given the
same weights (the "plain copy" promise of the parameter layout).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from shared.model import GPT, MLP, GPTConfig, LayerNorm, RMSNorm

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)

LLAMA_LIKE = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False,
                  tie_weights=False, n_kv_head=2)

VARIANTS = {
    "learned": dict(),
    "sinusoidal": dict(positions="sinusoidal"),
    "rope": dict(positions="rope"),
    "none": dict(positions="none"),
    "llama-gqa": LLAMA_LIKE,
    "mqa-window": dict(positions="rope", n_kv_head=1, sliding_window=4),
    "learned-window": dict(sliding_window=3, bias=False),
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


# ------------------------------------------------------------------ config


BAD_FIELDS = [
    ("vocab_size", 0), ("vocab_size", 1.5), ("block_size", -1), ("n_layer", 0),
    ("n_layer", True), ("n_head", 0), ("n_embd", 0), ("n_embd", 100),  # 100 % 6 != 0
    ("n_kv_head", 4), ("n_kv_head", 0), ("dropout", 1.0), ("dropout", -0.1),
    ("bias", "yes"), ("norm", "batchnorm"), ("norm_eps", 0.0), ("mlp", "relu"),
    ("mlp_hidden", 0), ("positions", "alibi"), ("rope_theta", 0.0),
    ("sliding_window", 0), ("tie_weights", 1),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}\b"):
        GPTConfig(**{field: value})


def test_config_rope_needs_even_head_size():
    with pytest.raises(ValueError, match=r"GPTConfig\.n_embd\b.*RoPE"):
        GPTConfig(n_embd=18, n_head=6, positions="rope")  # head size 3
    GPTConfig(n_embd=18, n_head=6, positions="learned")  # fine without RoPE


def test_config_defaults_are_resolved_and_round_trip_through_json():
    cfg = GPTConfig()
    assert cfg.n_kv_head == 6 and cfg.mlp_hidden == 4 * 384 and cfg.head_size == 64
    assert GPTConfig(mlp="swiglu").mlp_hidden == 1024  # 8/3 * 384 = 1024, a multiple of 64
    assert GPTConfig(mlp="swiglu", n_embd=4096, n_head=32).mlp_hidden == 10944
    cfg = GPTConfig(**TINY, **LLAMA_LIKE, sliding_window=8)
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_heads": 4})


# ------------------------------------------------------------------ layers


def test_rmsnorm_matches_torch():
    x = torch.randn(2, 5, 32)
    ours, ref = RMSNorm(32, eps=1e-5), torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    assert (ours(x) - ref(x)).abs().max() < 1e-6
    assert ours.bfloat16()(x.bfloat16()).dtype == torch.bfloat16  # float32 inside, bf16 out


def test_layernorm_with_and_without_bias_matches_torch():
    x = torch.randn(2, 5, 32)
    assert torch.allclose(LayerNorm(32, bias=True)(x), torch.nn.LayerNorm(32)(x), atol=1e-6)
    no_bias = LayerNorm(32, bias=False)
    assert no_bias.bias is None
    ref = torch.nn.LayerNorm(32, bias=False)
    assert torch.allclose(no_bias(x), ref(x), atol=1e-6)


def test_swiglu_matches_hugging_face_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    cfg = GPTConfig(**TINY, mlp="swiglu", bias=False)
    torch.manual_seed(0)
    ours = MLP(cfg)
    ref = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=cfg.mlp_hidden))
    ref.load_state_dict({"up_proj.weight": ours.c_fc.weight, "gate_proj.weight": ours.c_gate.weight,
                         "down_proj.weight": ours.c_proj.weight})
    x = torch.randn(2, 3, 32)
    assert (ours(x) - ref(x)).abs().max() < 1e-6


# ------------------------------------------------------------------ forward and loss


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shapes(name):
    model = tiny(**VARIANTS[name])
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 64) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and loss.item() > 0


def test_loss_at_init_is_about_ln_vocab():
    # At init the logits are h . w with h ~ unit-variance (after ln_f) and w ~ N(0, 0.02^2),
    # so they are ~N(0, s^2) with s^2 = 0.02^2 * C, independent of the random target. Then
    # E[loss] = E[logsumexp(z) - z_y] ~ ln V + s^2 / 2 (log of a Gaussian's mean exp).
    V, C = 1000, 64
    model = tiny(vocab_size=V, n_embd=C)
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, V, (2, 8, 16), generator=g)
    _, loss = model(idx, tgt)
    expected = math.log(V) + 0.02**2 * C / 2
    # 128 targets, each loss with std ~ s = 0.16: the mean is within ~0.014 of E[loss].
    assert abs(loss.item() - expected) < 0.05, (loss.item(), expected)


def test_loss_ignores_minus_100_targets():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 64, (2, 2, 16), generator=g)
    logits, loss = model(idx, tgt)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 64), tgt.reshape(-1)))
    masked = tgt.clone()
    masked[:, :10] = -100  # e.g. the prompt part of an SFT example
    _, loss_masked = model(idx, masked)
    keep = logits[:, 10:].reshape(-1, 64), tgt[:, 10:].reshape(-1)
    assert torch.allclose(loss_masked, F.cross_entropy(*keep), atol=1e-6)
    assert not torch.allclose(loss_masked, loss)


def test_forward_rejects_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="long"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    for positions in ("learned", "sinusoidal"):
        with pytest.raises(ValueError, match="block_size"):
            tiny(positions=positions)(torch.zeros(1, 17, dtype=torch.long))
        cache = tiny(positions=positions).new_cache(1)
        cache.pos = 16
        with pytest.raises(ValueError, match="block_size"):
            tiny(positions=positions)(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    # RoPE has no position table, so a longer input runs.
    assert tiny(positions="rope")(torch.zeros(1, 20, dtype=torch.long))[0].shape == (1, 20, 64)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_logits_equal_uncached(name):
    model = tiny(**VARIANTS[name])
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    cache, chunks, start = model.new_cache(2), [], 0
    for n in (6, 1, 1, 5, 3):  # a prompt, single tokens, then chunks (speculative decoding)
        chunks.append(model(idx[:, start:start + n], cache=cache)[0])
        start += n
        assert cache.pos == start
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-5


def test_dropout_only_in_training_mode():
    model = tiny(dropout=0.2)
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_matches_hugging_face_llama_given_the_same_weights():
    # The parameter layout promised in shared.model's docstring: RoPE in rotate_half order,
    # q/k/v as row blocks of c_attn, c_fc = up, c_gate = gate, c_proj = down.
    from transformers import LlamaConfig, LlamaForCausalLM
    model = tiny(**LLAMA_LIKE, norm_eps=1e-6, rope_theta=500.0)
    cfg = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=cfg.mlp_hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False)).eval()
    sd, q_rows = model.state_dict(), 4 * 8
    hf_sd = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
             "model.norm.weight": sd["transformer.ln_f.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        p, h = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attn.c_attn.weight"].split([q_rows, 16, 16])
        hf_sd |= {h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                  h + "self_attn.v_proj.weight": v,
                  h + "self_attn.o_proj.weight": sd[p + "attn.c_proj.weight"],
                  h + "mlp.up_proj.weight": sd[p + "mlp.c_fc.weight"],
                  h + "mlp.gate_proj.weight": sd[p + "mlp.c_gate.weight"],
                  h + "mlp.down_proj.weight": sd[p + "mlp.c_proj.weight"],
                  h + "input_layernorm.weight": sd[p + "ln_1.weight"],
                  h + "post_attention_layernorm.weight": sd[p + "ln_2.weight"]}
    hf.load_state_dict(hf_sd)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() < 1e-5


# ------------------------------------------------------------------ init


def test_weight_tying_and_gpt2_init():
    model = tiny(n_embd=256, n_head=4, n_layer=4)
    assert model.transformer.wte.weight is model.lm_head.weight
    h0 = model.transformer.h[0]
    assert abs(h0.attn.c_attn.weight.std().item() - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * 4)
    assert abs(h0.attn.c_proj.weight.std().item() - scaled) < 0.0005
    assert abs(h0.mlp.c_proj.weight.std().item() - scaled) < 0.0005
    assert h0.attn.c_attn.bias.abs().max() == 0
    assert tiny(tie_weights=False).lm_head.weight is not tiny().transformer.wte.weight


# ------------------------------------------------------------------ counting


def test_parameter_counts_of_gpt2_small_and_llama2_7b_on_the_meta_device():
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    llama = GPTConfig(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096,
                      mlp="swiglu", mlp_hidden=11008, positions="rope", norm="rmsnorm",
                      bias=False, tie_weights=False)
    with torch.device("meta"):
        m_gpt2, m_llama = GPT(gpt2), GPT(llama)
    assert all(p.is_meta for p in m_llama.parameters())  # nothing was allocated
    assert m_gpt2.num_params(non_embedding=False) == 124_439_808
    assert m_gpt2.num_params() == 124_439_808 - 1024 * 768  # minus wpe (nanoGPT's 123.65M)
    assert m_llama.num_params(non_embedding=False) == 6_738_415_616
    assert m_llama.num_params() == 6_738_415_616 - 32000 * 4096  # minus the untied embedding


def hand_count(c: GPTConfig) -> int:
    """Parameters of a config with bias=False, LayerNorm, GELU, learned positions, tied."""
    C, H, hs = c.n_embd, c.mlp_hidden, c.head_size
    attn = C * (c.n_head + 2 * c.n_kv_head) * hs + C * C
    mlp = 2 * C * H
    norms = 2 * C
    return c.vocab_size * C + c.block_size * C + c.n_layer * (attn + mlp + norms) + C


def test_num_params_and_flops_per_token_against_a_hand_count_and_a_flop_counter():
    model = tiny(bias=False, n_kv_head=2)
    c = model.config
    assert model.num_params(non_embedding=False) == hand_count(c)
    N = hand_count(c) - c.block_size * c.n_embd
    assert model.num_params() == N
    T = 12
    assert model.flops_per_token(T) == 6 * N + 12 * c.n_layer * c.n_embd * T
    assert model.flops_per_token() == 6 * N + 12 * c.n_layer * c.n_embd * c.block_size

    # Count the matmul FLOPs of one training step (forward + backward). The by-hand attention
    # is used so that q k^T and att v show up as matmuls (the counter skips CPU SDPA).
    for block in model.transformer.h:
        block.attn.use_sdpa = False
    model.train()
    idx = torch.randint(0, 64, (2, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    # The formula also counts 6 FLOPs per norm weight, which do no matmul.
    norm_weights = (2 * c.n_layer + 1) * c.n_embd
    assert counter.get_total_flops() == 2 * T * (model.flops_per_token(T) - 6 * norm_weights)


def test_estimate_mfu():
    model = tiny()
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1e-9)
    with pytest.raises(ValueError):
        model.estimate_mfu(0, 1e12)


# ------------------------------------------------------------------ learning


@pytest.mark.parametrize("name", ["learned", "llama-gqa"])
def test_overfits_a_tiny_batch(name):
    model = tiny(**VARIANTS[name]).train()
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 64, (2, 4, 16), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):  # about 80 steps are needed; stop as soon as it has memorised
        _, loss = model(idx, tgt)
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
