"""shared.hf: conversion to and from transformers' GPT2LMHeadModel and LlamaForCausalLM.

The reference is transformers itself: the converted model's logits must equal ours within
1e-4 in float32 (the same maths in a different order; observed differences are ~1e-6),
and its `generate` must pick the same greedy tokens as `shared.sampling`.
"""

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from shared.hf import from_hf, gpt_config, hf_config, to_hf
from shared.model import GPT, GPTConfig
from shared.sampling import generate

TOL = 1e-4

GPT2_STYLE = dict(positions="learned", norm="layernorm", mlp="gelu")
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)

CONFIGS = {
    "gpt2": dict(GPT2_STYLE),
    "gpt2-nobias-untied": dict(GPT2_STYLE, bias=False, tie_weights=False),
    "llama-gqa-untied": dict(LLAMA_STYLE, n_kv_head=2, tie_weights=False, rope_theta=500.0),
    "llama-gqa-tied": dict(LLAMA_STYLE, n_kv_head=2, tie_weights=True),
    "llama-mqa-bias": dict(LLAMA_STYLE, n_kv_head=1, bias=True, mlp_hidden=48),
}


def random_model(name: str, seed: int = 0) -> GPT:
    """A small random model whose norms and biases are not at their init (ones, zeros),
    so a norm or bias copied to the wrong place would show in the logits."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=71, block_size=24, n_layer=2, n_head=4, n_embd=32,
                    **CONFIGS[name])
    model = GPT(cfg)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "weight" in name_ and p.dim() == 1:  # norm gains around 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    model = random_model(name)
    hf_model = to_hf(model)
    expected = GPT2LMHeadModel if name.startswith("gpt2") else LlamaForCausalLM
    assert isinstance(hf_model, expected) and not hf_model.training
    x = torch.randint(0, 71, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf_model(x).logits
    assert ours.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_identical(name):
    model = random_model(name)
    back = from_hf(to_hf(model))
    assert back.config == model.config and not back.training
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert back.config.tie_weights == (
        back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr())


def test_hf_model_is_an_independent_copy():
    model = random_model("llama-gqa-untied")
    hf_model = to_hf(model)
    with torch.no_grad():
        hf_model.model.layers[0].self_attn.k_proj.weight.zero_()
    x = torch.randint(0, 71, (1, 10))
    with torch.no_grad():
        assert not torch.allclose(hf_model(x).logits, model(x)[0], atol=TOL)


def test_llama_split_follows_heads():
    """q_proj / k_proj / v_proj are the row blocks [q | k | v] of c_attn, in GQA sizes."""
    model = random_model("llama-gqa-untied")
    attn = to_hf(model).model.layers[1].self_attn
    w = model.transformer.h[1].attn.c_attn.weight  # (4*8 + 2*8 + 2*8, 32)
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)
    assert torch.equal(attn.k_proj.weight, w[32:48]) and torch.equal(attn.v_proj.weight, w[48:])


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_greedy_generate_matches_transformers(name):
    model = random_model(name)
    hf_model = to_hf(model)
    prompt = torch.tensor([[5, 17, 3, 42], [8, 8, 1, 60]])
    ours = generate(model, prompt, max_new_tokens=16, temperature=0)
    theirs = hf_model.generate(prompt, max_new_tokens=16, do_sample=False,
                               attention_mask=torch.ones_like(prompt))
    assert ours.shape == (2, 20)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 4:].flatten().tolist())) > 2  # not one token repeated


def test_config_mapping_names_the_fields():
    cfg = GPTConfig(vocab_size=71, block_size=24, n_layer=2, n_head=4, n_embd=32,
                    n_kv_head=2, **LLAMA_STYLE)
    hc = hf_config(cfg)
    assert (hc.num_key_value_heads, hc.head_dim, hc.intermediate_size) == (2, 8, 128)
    assert hc.rope_parameters["rope_theta"] == 10000.0
    assert hc.rms_norm_eps == cfg.norm_eps and not hc.attention_bias and not hc.mlp_bias
    assert gpt_config(hc) == cfg
    g = hf_config(GPTConfig(vocab_size=71, block_size=24, n_layer=2, n_head=4, n_embd=32))
    assert g.activation_function == "gelu" and g.n_inner == 128 and g.tie_word_embeddings


@pytest.mark.parametrize("change, field", [
    (dict(positions="sinusoidal"), "positions"),
    (dict(positions="none"), "positions"),
    (dict(sliding_window=8), "sliding_window"),
    (dict(norm="rmsnorm"), "norm"),
    (dict(mlp="swiglu"), "mlp"),
    (dict(n_kv_head=2), "n_kv_head"),
    (dict(positions="rope", norm="layernorm", mlp="swiglu"), "norm"),
    (dict(positions="rope", norm="rmsnorm", mlp="gelu"), "mlp"),
])
def test_unsupported_config_raises(change, field):
    cfg = GPTConfig(vocab_size=71, block_size=24, n_layer=1, n_head=4, n_embd=32, **change)
    with pytest.raises(ValueError, match=field):
        to_hf(GPT(cfg))


def test_unsupported_hf_model_raises():
    gpt2 = to_hf(random_model("gpt2"))
    gpt2.config.activation_function = "gelu_new"  # real GPT-2's tanh GELU
    with pytest.raises(ValueError, match="activation_function"):
        from_hf(gpt2)
    cfg = LlamaConfig(vocab_size=71, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="RoPE scaling"):
        from_hf(LlamaForCausalLM(cfg))
