"""shared.lora: the adapter layer, injection, merging, saving; checked against `peft`.

The reference is `peft` on the same model converted with `shared.hf.to_hf`: with the same
A and B copied in, its logits must equal ours within 1e-4 in float32 (observed ~1e-6).
"""

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from shared.hf import to_hf
from shared.lora import (
    LoRALinear,
    count_parameters,
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
)
from shared.model import GPT, GPTConfig

TOL = 1e-4


def gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=53, block_size=16, n_layer=2, n_head=2, n_embd=16,
               positions="learned", norm="layernorm", mlp="gelu")
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def test_zero_init_is_the_base_model():
    base = gpt()
    x = torch.randint(53, (3, 16))
    adapted = gpt()
    names = inject_lora(adapted, r=4, alpha=8)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert torch.equal(adapted(x)[0], base(x)[0])


def test_only_adapters_train_and_their_share():
    model = gpt()
    total_before = count_parameters(model)[1]
    inject_lora(model, r=2)
    trainable, total = count_parameters(model)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B"}
    expected = 2 * 2 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))  # r (in + out) each
    assert trainable == expected and total == total_before + expected


def test_swiglu_targets_include_the_gate():
    model = gpt(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    names = inject_lora(model, r=1)
    assert sum(n.endswith("c_gate") for n in names) == 2 and len(names) == 10


def test_merge_equals_unmerged_and_unmerge_restores():
    model = gpt()
    inject_lora(model, r=4, alpha=16)
    randomise_adapters(model)
    x = torch.randint(53, (2, 16))
    before = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
    with torch.no_grad():
        y = model(x)[0]
        for layer in lora_layers(model).values():
            layer.merge()
        y_merged = model(x)[0]
        for layer in lora_layers(model).values():
            layer.unmerge()
    assert (y - y_merged).abs().max() < 1e-5
    assert (y - model(x)[0]).abs().max() < 1e-5
    for n, m in lora_layers(model).items():
        assert (m.base.weight - before[n]).abs().max() < 1e-6
    merged = merge_lora(model)
    assert not lora_layers(merged) and count_parameters(merged)[0] == 0
    with torch.no_grad():
        assert (merged(x)[0] - y).abs().max() < 1e-5


def test_gradients_reach_only_the_adapters():
    model = gpt()
    inject_lora(model, r=2)
    x = torch.randint(53, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # B = 0, so A's gradient is zero at the first step and B's is not (the paper's design)
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() > 0


def test_save_and_load_adapters():
    src = gpt()
    inject_lora(src, r=3)
    randomise_adapters(src, seed=5)
    state = lora_state_dict(src)
    assert len(state) == 2 * 8
    dst = gpt()
    inject_lora(dst, r=3)
    load_lora_state_dict(dst, state)
    x = torch.randint(53, (2, 16))
    with torch.no_grad():
        assert torch.equal(src(x)[0], dst(x)[0])
    other = gpt()
    inject_lora(other, r=3, targets=("c_attn",))
    with pytest.raises(ValueError, match="adapter keys differ"):
        load_lora_state_dict(other, state)


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.0), dict(r=2, alpha=0),
                                 dict(r=2, dropout=1.0)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(3, 3), **bad)


def test_no_matching_target_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(gpt(), r=2, targets=("q_proj",))


def test_merge_needs_a_linear_base():
    class Frozen(nn.Module):
        in_features, out_features = 3, 2

        def forward(self, x):
            return x[..., :2]

    layer = LoRALinear(Frozen(), r=1)
    assert layer(torch.ones(1, 3)).shape == (1, 2)
    with pytest.raises(TypeError, match="nn.Linear"):
        layer.merge()


def test_matches_peft_on_the_converted_model():
    ours = gpt()
    hf = to_hf(gpt()).eval()
    inject_lora(ours, r=4, alpha=8)
    randomise_adapters(ours)
    with torch.no_grad():  # non-zero A and B, copied into peft's layers
        for layer in lora_layers(ours).values():
            layer.lora_A.mul_(3.0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                     fan_in_fan_out=True, lora_dropout=0.0)
    peft_model = get_peft_model(hf, cfg).eval()
    ours_layers = lora_layers(ours)
    copied = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                key = name.split("transformer.", 1)[1]
                mine = ours_layers["transformer." + key]
                module.lora_A["default"].weight.copy_(mine.lora_A)
                module.lora_B["default"].weight.copy_(mine.lora_B)
                copied += 1
    assert copied == len(ours_layers) == 8
    x = torch.randint(53, (2, 16))
    with torch.no_grad():
        ref = peft_model(input_ids=x).logits
        mine = ours(x)[0]
    assert mine.shape == ref.shape
    assert (mine - ref).abs().max() < TOL
    assert count_parameters(ours)[0] == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)
