"""shared.moe and the MoE option of shared.model.

References: a naive loop over tokens and their k choices (1e-6), Hugging Face's
`MixtralSparseMoeBlock` and `load_balancing_loss_func` given the same weights, hand-made
routings whose capacity drops and balancing loss are known exactly, and the dense model
the MoE reduces to (one expert; all experts with their softmax weights).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from shared.hf import to_hf
from shared.model import GPT, MLP, GPTConfig
from shared.moe import MoE, expert_capacity, load_balancing_loss

C = 32
TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=C)


def moe(seed: int = 0, **overrides) -> MoE:
    """A small MoE whose router is sharp enough that the top-k choices are not near-ties."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY, "n_expert": 4, "n_expert_active": 2, "mlp_hidden": 24,
                       **overrides})
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    return layer.eval()


def naive(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, choice by choice, with the capacity queue kept by hand."""
    B, T, _ = x.shape
    xs = x.reshape(B * T, -1)
    N, E, k = xs.size(0), layer.n_expert, layer.k
    choices = []  # (token, expert, weight) per token
    for n in range(N):
        probs = F.softmax(layer.router(xs[n]), dim=-1)
        top = sorted(range(E), key=lambda e: -probs[e].item())[:k]
        total = sum(probs[e] for e in top)
        choices.append([(e, probs[e] / total) for e in top])
    cap = math.inf if layer.capacity_factor is None else math.ceil(
        layer.capacity_factor * N * k / E)
    used = [0] * E
    y = torch.zeros_like(xs)
    for j in range(k):  # first choices of every token before any second choice
        for n in range(N):
            e, w = choices[n][j]
            if used[e] < cap:
                used[e] += 1
                y[n] += w * layer.experts[e](xs[n : n + 1])[0]
    return y.reshape(x.shape), torch.tensor(used)


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize(("E", "k", "cf"), [(4, 1, None), (4, 2, None), (8, 3, None),
                                           (4, 1, 1.0), (4, 2, 0.5), (8, 2, 1.25)])
def test_moe_equals_naive_per_token_loop(mlp, E, k, cf):
    # float64, so the only difference left is the order of the sums (~1e-16, not float32's
    # ~1e-6): any routing or weighting mistake shows far above the tolerance.
    layer = moe(n_expert=E, n_expert_active=k, capacity_factor=cf, mlp=mlp).double()
    x = torch.randn(3, 7, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = layer(x)
        ref, used = naive(layer, x)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    assert torch.equal(layer.stats.kept, used)
    assert ours.abs().max() > 0.1  # not a comparison of two near-zero tensors


def test_moe_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    layer = moe(n_expert=4, n_expert_active=2, mlp="swiglu", bias=False)
    hf = MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=C, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
        hidden_act="silu", router_jitter_noise=0.0)).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(layer.router.weight)
        for e, ex in enumerate(layer.experts):  # Mixtral stores [gate; up] fused per expert
            hf.experts.gate_up_proj[e].copy_(torch.cat([ex.c_gate.weight, ex.c_fc.weight]))
            hf.experts.down_proj[e].copy_(ex.c_proj.weight)
        x = torch.randn(2, 9, C)
        torch.testing.assert_close(layer(x), hf(x), atol=1e-5, rtol=0)


def test_all_experts_active_is_the_softmax_weighted_sum():
    layer = moe(n_expert=4, n_expert_active=4)
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        probs = F.softmax(layer.router(x), dim=-1)  # (B, T, E)
        dense = sum(probs[..., e : e + 1] * ex(x) for e, ex in enumerate(layer.experts))
        torch.testing.assert_close(layer(x), dense, atol=1e-6, rtol=0)


def test_one_expert_is_the_dense_mlp():
    layer = moe(n_expert=1, n_expert_active=1)
    mlp = MLP(GPTConfig(**TINY, mlp_hidden=24))
    mlp.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), mlp(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ capacity


def test_capacity_drops_exactly_the_overflow():
    # Every token prefers expert 0: with cf=1, N=8, k=1, E=4 it takes ceil(8/4) = 2 tokens,
    # the first two; the other six get a zero output (they pass on the residual).
    layer = moe(n_expert=4, n_expert_active=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.randn(1, 8, C)
    x[..., 0] = x[..., 0].abs() + 1.0  # so x @ router prefers expert 0 for every token
    with torch.no_grad():
        y = layer(x)
        first_two = layer.experts[0](x[:, :2])
    assert layer.stats.capacity == expert_capacity(8, 4, 1, 1.0) == 2
    assert layer.stats.kept.tolist() == [2, 0, 0, 0]
    assert layer.stats.load.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert layer.stats.dropped_frac.item() == pytest.approx(6 / 8)
    torch.testing.assert_close(y[:, :2], first_two, atol=1e-6, rtol=0)
    assert torch.equal(y[:, 2:], torch.zeros_like(y[:, 2:]))


def test_second_choices_are_dropped_before_first_choices():
    layer = moe(n_expert=4, n_expert_active=2, capacity_factor=0.5)
    x = torch.randn(4, 8, C)
    with torch.no_grad():
        layer(x)
    # With cf=0.5 only half the assignments fit; a token loses its first choice only if
    # that expert's queue is full of other first choices.
    cap = layer.stats.capacity
    assert cap == math.ceil(0.5 * 32 * 2 / 4) and layer.stats.kept.max() <= cap
    assert layer.stats.dropped_frac.item() >= 0.5 - 1e-6


def test_large_capacity_drops_nothing():
    layer = moe(capacity_factor=4.0)  # E/k = 2 would already suffice for any routing
    x = torch.randn(2, 8, C)
    with torch.no_grad():
        y = layer(x)
        layer.capacity_factor = None
        torch.testing.assert_close(y, layer(x), atol=0, rtol=0)
    assert layer.stats.dropped_frac.item() == 0.0


# ------------------------------------------------------------------ load balancing


def test_balancing_loss_on_hand_made_routings():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    top1 = torch.zeros(N, 1, dtype=torch.long)  # all to expert 0: P uniform still gives 1
    assert load_balancing_loss(uniform, top1).item() == pytest.approx(1.0)
    spread = torch.arange(N).remainder(E)[:, None]
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed, top1).item() == pytest.approx(E)  # the maximum
    # Half the tokens to expert 0 with prob 1, half to expert 1: f = P = (1/2, 1/2, 0, 0).
    half = F.one_hot(torch.arange(N) % 2, E).float()
    assert load_balancing_loss(half, (torch.arange(N) % 2)[:, None]).item() == pytest.approx(2.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balancing_loss_is_transformers_mixtral_over_k(k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(k))
    probs = F.softmax(logits, dim=-1)
    ours = load_balancing_loss(probs, probs.topk(k, dim=-1).indices)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
    torch.testing.assert_close(ours * k, theirs, atol=1e-6, rtol=0)


def test_balancing_loss_gradient_reaches_the_router():
    layer = moe().train()
    layer(torch.randn(2, 8, C))
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ config and GPT


BAD_FIELDS = [
    ("n_expert", -1), ("n_expert", 2.0), ("n_expert_active", 0), ("n_expert_active", 5),
    ("moe_every", 0), ("moe_every", 3), ("capacity_factor", 0.0), ("capacity_factor", True),
    ("capacity_factor", "1"), ("moe_aux_loss_coef", -0.1), ("moe_aux_loss_coef", None),
    ("moe_hidden", 0), ("moe_hidden", 1.5),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_config_rejects_bad_moe_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}\b"):
        GPTConfig(**{**TINY, "n_expert": 4, field: value})


def test_config_round_trips_and_old_dicts_load_as_dense():
    cfg = GPTConfig(**TINY, n_expert=4, n_expert_active=1, moe_every=2, capacity_factor=1.25,
                    moe_hidden=16)
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if "expert" not in k and "moe" not in k
           and k != "capacity_factor"}  # a config saved before the MoE fields existed
    assert GPTConfig.from_dict(old).n_expert == 0
    assert GPTConfig(**TINY).n_expert == 0 and not GPTConfig(**TINY).is_moe_layer(0)
    assert GPTConfig(**TINY, n_expert=4).moe_hidden == 4 * C  # None -> mlp_hidden


def test_hybrid_stack_alternates_dense_and_moe():
    model = GPT(GPTConfig(**{**TINY, "n_layer": 4}, n_expert=4, moe_every=2))
    kinds = [type(b.mlp).__name__ for b in model.transformer.h]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    assert "transformer.h.1.mlp.experts.3.c_proj.weight" in model.state_dict()


def test_narrow_experts_match_the_dense_models_active_params():
    # Two experts of half the width per token: the same weights as the dense MLP, plus a
    # router (bias=False: with biases each expert would bring its own c_proj bias).
    dense = GPT(GPTConfig(**{**TINY, "n_layer": 4}, mlp_hidden=64, bias=False))
    hybrid = GPT(GPTConfig(**{**TINY, "n_layer": 4}, mlp_hidden=64, bias=False, n_expert=8,
                           n_expert_active=2, moe_hidden=32, moe_every=2))
    assert hybrid.transformer.h[1].mlp.experts[0].c_fc.weight.shape == (32, C)
    assert hybrid.transformer.h[0].mlp.c_fc.weight.shape == (64, C)
    assert hybrid.num_params(active=True) - dense.num_params() == 2 * 8 * C  # two routers


def test_active_params_equal_the_dense_model_plus_routers():
    moe_cfg = GPTConfig(**TINY, n_expert=4, n_expert_active=2, mlp_hidden=24)
    dense_cfg = GPTConfig(**TINY, mlp_hidden=24)
    moe_model, dense = GPT(moe_cfg), GPT(dense_cfg)
    mlp = sum(p.numel() for p in MLP(dense_cfg).parameters())
    routers = TINY["n_layer"] * C * 4
    assert moe_model.num_params(active=True) == dense.num_params() + mlp * 2 + routers
    assert moe_model.num_params() == dense.num_params() + mlp * 6 + routers
    assert dense.num_params(active=True) == dense.num_params()
    assert moe_model.flops_per_token(16) - dense.flops_per_token(16) == 6 * (2 * mlp + routers)


def test_aux_loss_enters_only_in_training_mode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, n_expert=4, moe_aux_loss_coef=0.5))
    x = torch.randint(0, 64, (2, 16))
    _, train_loss = model.train()(x, x)  # dropout is 0: the two modes differ only by aux
    aux = torch.stack([b.mlp.aux_loss for b in model.transformer.h]).mean()
    _, eval_loss = model.eval()(x, x)
    assert aux.item() >= 1.0 - 1e-6  # the balancing loss is never below 1
    torch.testing.assert_close(train_loss, eval_loss + 0.5 * aux, atol=1e-6, rtol=0)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, positions="rope", n_expert=4)).eval()
    x = torch.randint(0, 64, (2, 12))
    cache = model.new_cache(2)
    with torch.no_grad():
        full, _ = model(x)
        steps = [model(x[:, :5], cache=cache)[0]] + [
            model(x[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_gpt_with_moe_trains():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, n_expert=4, n_expert_active=1, capacity_factor=1.5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.arange(64).repeat(20)  # a periodic sequence: next token = current + 1
    losses = []
    for _ in range(60):
        i = torch.randint(0, len(data) - 17, (8,), generator=g)
        x = torch.stack([data[j : j + 16] for j in i])
        y = torch.stack([data[j + 1 : j + 17] for j in i])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 0.5 * losses[0]
    assert model.transformer.h[0].mlp.router.weight.grad.abs().sum() > 0


def test_to_hf_refuses_moe():
    model = GPT(GPTConfig(**TINY, n_expert=4))
    with pytest.raises(ValueError, match=r"GPTConfig\.n_expert\b"):
        to_hf(model)
