"""Preference tuning and RL for chat models: reply log-probabilities, a reward model, DPO, GRPO.

Week 4 builds each of these by hand in its notebook and checks it against this module; the
later notebooks of the week (and week 6's distillation) import it. Everything works on
conversations in the tiny world's chat template (`shared.tinyworld.encode_chat`), where
the labels mark the reply tokens: a reply's log-probability is the sum over exactly the
tokens SFT was trained on (assistant content and its <|end|>).

- `batch_chats`: conversations -> right-padded (ids, labels, lengths).
- `reply_logprobs`: log pi(reply | prompt) per conversation, differentiable.
- `RewardModel`: a GPT trunk with a scalar head read at the last token (Ouyang et al. 2022,
  "Training language models to follow instructions with human feedback",
  https://arxiv.org/abs/2203.02155), trained with `bradley_terry_loss`.
- `dpo_loss`: Rafailov et al. 2023, "Direct Preference Optimization",
  https://arxiv.org/abs/2305.18290, eq. 7, with the implicit rewards it implies.
- `group_advantages`: GRPO's reward normalisation within a group of samples of one prompt
  (Shao et al. 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300, sec. 4.1).
- PPO's pieces, on (B, T) tensors of sampled reply tokens with a 0/1 mask (Schulman et al.
  2017, "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347):
  `kl_per_token` (the per-token KL estimates against the frozen reference), `gae`
  (generalised advantage estimation, Schulman et al. 2015, https://arxiv.org/abs/1506.02438)
  and `ppo_clip_loss` (eq. 7, the clipped surrogate). week4/03 builds each by hand first.

Left out: PPO's value head and training loop (week4/03 writes them; nothing else uses
them), IPO / KTO / ORPO variants, reference-model-free DPO, and padding-free batching.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.tinyworld import encode_chat


def batch_chats(tok, conversations: list[list[dict]], pad_id: int = 0):
    """(ids, labels, lengths): each (B, T_max) long, right-padded with `pad_id` and -100.

    labels follow encode_chat (labels[i] is ids[i] on reply tokens, else -100); lengths
    (B,) counts each conversation's real tokens.
    """
    if not conversations:
        raise ValueError("batch_chats needs at least one conversation")
    encoded = [encode_chat(tok, conv) for conv in conversations]
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), -100, dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    lengths = torch.tensor([len(x) for x, _ in encoded])
    return ids, labels, lengths


def token_logprobs(model, ids: torch.Tensor, labels: torch.Tensor):
    """(logp, mask), each (B, T-1): log-probability of token t+1 given tokens <= t where
    labels[t+1] != -100, and 0 elsewhere; mask marks the scored positions."""
    logits, _ = model(ids[:, :-1])  # (B, T-1, V)
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return logp * mask, mask


def reply_logprobs(model, tok, conversations: list[list[dict]]) -> torch.Tensor:
    """(B,) log pi(replies | prompt): summed over each conversation's reply tokens."""
    ids, labels, _ = batch_chats(tok, conversations)
    device = next(model.parameters()).device
    logp, _ = token_logprobs(model, ids.to(device), labels.to(device))
    return logp.sum(-1)


class RewardModel(nn.Module):
    """r(prompt, reply): a GPT trunk and a linear head on the final hidden state of the
    conversation's last token (its closing <|end|>), one scalar per conversation.

    The trunk's lm_head is kept (so its weights stay a valid GPT) but unused: the features
    are the output of the final norm, caught with a forward hook.
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)  # every reply starts at reward 0
        nn.init.zeros_(self.head.bias)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, C): the trunk's final-norm hidden states."""
        caught = []
        hook = self.gpt.transformer.ln_f.register_forward_hook(lambda m, i, o: caught.append(o))
        try:
            self.gpt(ids)
        finally:
            hook.remove()
        return caught[0]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.features(ids)  # (B, T, C)
        last = h[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1]
        return self.head(last).squeeze(-1)  # (B,)

    def score(self, tok, conversations: list[list[dict]]) -> torch.Tensor:
        """(B,) rewards of whole conversations (prompt and reply)."""
        ids, _, lengths = batch_chats(tok, conversations)
        device = next(self.parameters()).device
        return self(ids.to(device), lengths.to(device))


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged: the negative log-likelihood of the
    preferences under P(chosen > rejected) = sigmoid(r_c - r_r) (Bradley & Terry 1952)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1):
    """(loss, reward_chosen, reward_rejected) from reply log-probs (B,) each.

    The implicit reward of a reply is beta * (log pi(y|x) - log pi_ref(y|x)); the loss is
    the Bradley-Terry loss of those rewards. Rewards come back detached, for accuracy and
    margin curves.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r_c = beta * (policy_chosen - ref_chosen)
    r_r = beta * (policy_rejected - ref_rejected)
    return bradley_terry_loss(r_c, r_r), r_c.detach(), r_r.detach()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(G,) or (P, G) rewards of G samples per prompt -> (r - group mean) / (group std + eps).

    A group whose samples all score the same gets advantage 0: it carries no signal.
    std is the population std (unbiased=False), as GRPO implementations use.
    """
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (G,) or (P, G), got shape {tuple(rewards.shape)}")
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from log-probs of tokens *sampled from pi*.

    k1 = log pi - log pi_ref: unbiased, can be negative for one token (InstructGPT's penalty);
    k3 = exp(-k1) - 1 + k1: also unbiased, never negative, lower variance (Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). Both have
    expectation KL(pi || pi_ref) over tokens sampled from pi; neither is the KL of one token.

    >>> kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    tensor([ 0.5000, -1.0000])
    >>> kl_per_token(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), "k3")
    tensor([0.1065, 0.7183])
    """
    k1 = logp - ref_logp
    if kind == "k1":
        return k1
    if kind == "k3":
        return torch.expm1(-k1) + k1
    raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T): generalised advantage estimation over each row's
    tokens where mask is 1 (a reply's tokens, contiguous; padding after them is 0).

    delta_t = r_t + gamma * V_{t+1} - V_t (V = 0 after a row's last token) and
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V are the value head's targets.
    gamma = lam = 1 gives A_t = (sum of rewards from t on) - V_t; lam = 0 the one-step TD
    error. Both come back 0 on masked positions.

    >>> a, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]),
    ...              torch.ones(1, 3), gamma=1.0, lam=1.0)
    >>> a, ret
    (tensor([[0.5000, 0.5000, 0.5000]]), tensor([[1., 1., 1.]]))
    """
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):  # T is a reply's length: a short loop
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        # a padding position hands on nothing: V and A after a row's end are 0
        next_value = values[:, t]
    return adv, (adv + values) * mask


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): PPO's clipped surrogate, negated to minimise, averaged over the
    masked tokens.

    ratio = exp(logp - old_logp); per token -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A):
    once a token's probability has moved by more than `clip` in the direction its advantage
    asks, its gradient is 0, so one batch of samples can be reused for a few steps safely.
    The clip fraction is the share of masked tokens whose ratio lies outside the clip range.

    >>> loss, frac = ppo_clip_loss(torch.log(torch.tensor([[1.5, 0.5]])), torch.zeros(1, 2),
    ...                            torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    >>> round(loss.item(), 4), frac.item()  # -(min(1.5, 1.2) + min(0.5, 0.8)) / 2
    (-0.85, 1.0)
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    n = mask.sum().clamp(min=1)
    frac = (((ratio - 1).abs() > clip).to(logp.dtype) * mask).sum() / n
    return (per_token * mask).sum() / n, frac.detach()
