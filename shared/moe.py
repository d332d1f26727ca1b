"""A mixture-of-experts feed-forward layer: top-k routing, a capacity limit, load balancing.

A router (one Linear C -> E, no bias) scores each token against E experts; the token goes
to its k best and its output is their weighted sum. Each expert is the block's ordinary
`shared.model.MLP`, so E experts hold E times the parameters while a token pays for only k:
total parameters grow, FLOPs per token do not (Shazeer et al. 2017,
https://arxiv.org/abs/1701.06538; GShard, Lepikhin et al. 2020,
https://arxiv.org/abs/2006.16668; Switch Transformer, Fedus et al. 2021,
https://arxiv.org/abs/2101.03961; Mixtral, Jiang et al. 2024, https://arxiv.org/abs/2401.04088).

    probs   = softmax(router(x))                 (N, E) over all experts
    top-k   = the k largest probs per token, renormalised to sum to 1 (Mixtral)
    y       = sum over the k chosen e of  weight_e * expert_e(x)

Capacity (GShard, Switch): with `capacity_factor` cf, each expert processes at most
ceil(cf * N * k / E) of the N * k assignments in a batch, the size a fixed-shape kernel
or an all-to-all buffer would give it. Assignments past that are dropped: that expert's
term is 0 for that token, which still passes through on the block's residual. First
choices take the places before second choices, and within a choice earlier tokens first.

subtle: with k = 1 the renormalised weight is always exactly 1, so the language-model loss
sends the router no gradient and only the balancing loss trains it. Switch (k = 1) scales the
output by the raw probability instead; use k >= 2 here, as Mixtral does.

Load balancing (Switch eq. 4): aux = E * sum_i f_i * P_i, with f_i the fraction of the
N * k assignments routed to expert i (counted before the capacity drop) and P_i the mean
router probability of expert i. Uniform routing gives 1.0, its minimum; a router that
sends everything to one expert with probability 1 gives E. f is a count and has no
gradient; the gradient reaches the router through P.
subtle: Hugging Face's Mixtral `load_balancing_loss_func` divides the counts by N rather
than N * k, so its value is k times this one.

Left out: router z-loss and jitter noise (ST-MoE, Switch), shared experts and fine-grained
experts (DeepSeekMoE), expert-choice routing, token dropping at eval time versus a larger
eval capacity, and expert parallelism itself (week 2's notebook counts its communication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.model import MLP, GPTConfig


@dataclass
class MoEStats:
    """What one forward pass did (detached tensors, for plots and logs).

    load: (E,) fraction of the N * k assignments the router sent to each expert (sums to 1).
    kept: (E,) assignments each expert actually processed (after the capacity limit).
    dropped_frac: fraction of the N * k assignments dropped by the capacity limit.
    aux_loss: the load-balancing loss of this pass (1.0 = perfectly balanced).
    capacity: the per-expert limit used, or None.
    """

    load: torch.Tensor
    kept: torch.Tensor
    dropped_frac: torch.Tensor
    aux_loss: torch.Tensor
    capacity: int | None


def expert_capacity(n_tokens: int, n_expert: int, k: int, capacity_factor: float) -> int:
    """ceil(cf * N * k / E): the most assignments one expert takes from a batch of N tokens."""
    return math.ceil(capacity_factor * n_tokens * k / n_expert)


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Switch's E * sum_i f_i P_i. probs (N, E) softmax over experts; top_idx (N, k) chosen."""
    E = probs.size(-1)
    f = torch.bincount(top_idx.reshape(-1), minlength=E).to(probs.dtype) / top_idx.numel()
    P = probs.mean(dim=0)  # (E,)
    return E * (f * P).sum()


class MoE(nn.Module):
    """Drop-in replacement for `MLP`: (B, T, C) -> (B, T, C), E experts, k active per token.

    After each forward, `aux_loss` holds the load-balancing loss (with its graph, for
    `GPT.forward` to add in training) and `stats` a detached `MoEStats`.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_expert < 1:
            raise ValueError(f"MoE needs GPTConfig.n_expert >= 1, got {config.n_expert}")
        self.n_expert = config.n_expert
        self.k = config.n_expert_active
        self.capacity_factor = config.capacity_factor
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        # Each expert is the block's MLP at width moe_hidden (Mixtral: the dense width; Qwen-MoE
        # and DeepSeekMoE use narrower ones, so a hybrid stack can match dense layers' FLOPs).
        self.experts = nn.ModuleList(
            [MLP(config, config.moe_hidden) for _ in range(config.n_expert)])
        self.aux_loss: torch.Tensor | None = None
        self.stats: MoEStats | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> probs (N, E), top-k weights (N, k) summing to 1, top-k indices (N, k)."""
        # The softmax in (at least) float32, as Switch's "selective precision" and HF's
        # Mixtral do: in bf16 the small probabilities that decide the balance lose digits.
        logits = self.router(x)  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        top_p, top_idx = probs.topk(self.k, dim=-1)  # (N, k), largest first
        weights = top_p / top_p.sum(dim=-1, keepdim=True)  # renormalised over the k chosen
        return probs, weights.to(x.dtype), top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # routing is per token: the batch and time axes are one
        N, E, k = x.size(0), self.n_expert, self.k
        probs, weights, top_idx = self.route(x)

        # The N * k assignments, first choices of every token before any second choice,
        # so the capacity limit below drops second choices first (GShard's priority).
        expert = top_idx.t().reshape(-1)  # (k * N,)
        token = torch.arange(N, device=x.device).repeat(k)  # (k * N,)
        weight = weights.t().reshape(-1)  # (k * N,)
        keep = torch.ones_like(expert, dtype=torch.bool)
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(N, E, k, self.capacity_factor)
            one_hot = F.one_hot(expert, E)  # (k * N, E)
            # position of each assignment in its expert's queue: 0, 1, 2, ...
            position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # (k * N,)
            keep = position < capacity

        # Dispatch: gather each expert's tokens, run it once, scatter-add the weighted
        # outputs back. A loop over experts (E is small), never over tokens.
        y = torch.zeros_like(x)
        for e in range(E):
            sel = torch.nonzero((expert == e) & keep).squeeze(-1)  # this expert's assignments
            if sel.numel() == 0:
                continue
            out = self.experts[e](x[token[sel]])  # (n_e, C)
            y.index_add_(0, token[sel], out * weight[sel, None])

        self.aux_loss = load_balancing_loss(probs, top_idx)
        with torch.no_grad():
            self.stats = MoEStats(
                load=torch.bincount(expert, minlength=E).float() / expert.numel(),
                kept=torch.bincount(expert[keep], minlength=E),
                dropped_frac=1.0 - keep.float().mean(),
                aux_loss=self.aux_loss.detach(),
                capacity=capacity,
            )
        return y.reshape(B, T, C)
