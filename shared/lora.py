"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer y = x W^T (+ b) gets a trainable low-rank update:

    y = x W^T (+ b) + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

B starts at zero, so at step 0 the adapted model *is* the base model (paper, sec. 4.1); A
starts random (Kaiming-uniform, as `peft` does) so that B's gradient is not zero. With Adam,
"tuning alpha is roughly the same as tuning the learning rate" (paper, sec. 4.1), so alpha is
fixed and not retuned per rank. Dividing by r only partly offsets the growth of B A with r:
week6/01 measures the first update shrinking like r^-1/2 and trained ones like r^-1/4;
rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) argues for alpha / sqrt(r).

- `LoRALinear`: wraps a frozen base layer (an `nn.Linear`, or any module with `in_features`,
  `out_features` and a forward, such as week6/03's 4-bit layer); `merge` folds B A into W so
  inference costs nothing extra, `unmerge` takes it back out.
- `inject_lora`: replaces the named linear layers of a model (by default every projection
  of the course GPT's blocks) with adapters and freezes everything else.
- `merge_lora`: folds every adapter in and returns plain `nn.Linear` layers (the `peft`
  `merge_and_unload`), `lora_state_dict` / `load_lora_state_dict`: the adapter weights only.
- `count_parameters`: (trainable, total), for the "share of parameters trained" tables.

Week 6 builds the layer by hand in `01_lora_from_scratch` and checks it against this module;
`02_peft_library` compares it with `peft`. Left out: rank-stabilised scaling (rsLoRA's
alpha / sqrt(r)), DoRA's magnitude/direction split, LoRA on embeddings, and per-layer ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The course GPT's linear layers inside its blocks (GPT-2 names): attention and MLP.
GPT_TARGETS = ("c_attn", "attn.c_proj", "c_fc", "c_gate", "mlp.c_proj")


class LoRALinear(nn.Module):
    """A frozen `base` layer plus a trainable rank-`r` update scaled by `alpha / r`.

    >>> layer = LoRALinear(nn.Linear(4, 3), r=2, alpha=4)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), layer.base(x))  # B = 0: the base model at initialisation
    True
    >>> layer.scaling, layer.lora_A.shape, layer.lora_B.shape
    (2.0, torch.Size([2, 4]), torch.Size([3, 2]))
    """

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not all(hasattr(base, a) for a in ("in_features", "out_features")):
            raise ValueError("base must have in_features and out_features (an nn.Linear or alike)")
        self.base, self.r = base, r
        self.alpha = float(alpha if alpha is not None else r)  # alpha = r: scaling 1
        self.scaling = self.alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        ref = next(base.parameters(), None)
        kw = {"device": ref.device if ref is not None else None,
              "dtype": ref.dtype if ref is not None and ref.is_floating_point() else None}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's and peft's init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """(out, in): the update B A * alpha / r that merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # subtle: (x A^T) B^T costs r (in + out) per token; forming B A first would cost in * out
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def _base_weight(self) -> torch.Tensor:
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"merging needs an nn.Linear base, not {type(self.base).__name__} "
                            "(a quantised base would have to be de-quantised and re-quantised)")
        return self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + B A * alpha / r; the forward then skips the adapter (same outputs)."""
        if not self.merged:
            self._base_weight().add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to float rounding), e.g. to keep training or swap adapters."""
        if self.merged:
            self._base_weight().sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.0,
                targets=GPT_TARGETS, base_factory=None) -> list[str]:
    """Freeze `model` and wrap every linear layer whose name ends with one of `targets`.

    Returns the wrapped names. `base_factory(linear) -> module`, if given, replaces each
    frozen base first (week6/03 passes one that stores the weight in 4 bits).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches targets {tuple(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if base_factory is not None:
            base = base_factory(base)
        setattr(parent, child, LoRALinear(base, r, alpha, dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base and put the plain base layers back (in place)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what one saves and ships: kilobytes, not the model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("lora_A", "lora_B"))}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by `lora_state_dict` into a model with the same adapters."""
    own = lora_state_dict(model)
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
