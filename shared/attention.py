"""Attention: scaled dot-product attention, RoPE, a KV cache and multi-head attention.

What this module holds, in reading order:

- `scaled_dot_product_attention`: the teaching version written out by hand,
  softmax(q k^T * scale + mask) v (Vaswani et al. 2017, "Attention Is All You Need",
  https://arxiv.org/abs/1706.03762), with grouped-query attention (Ainslie et al. 2023,
  https://arxiv.org/abs/2305.13245). The tests check it against PyTorch's
  `F.scaled_dot_product_attention`, which the model's fast path uses.
- `causal_mask`: which keys each query may see (causal, optionally a sliding window as in
  Mistral 7B, Jiang et al. 2023, https://arxiv.org/abs/2310.06825).
- `rope_frequencies` / `apply_rope`: rotary position embeddings (RoFormer, Su et al. 2021,
  https://arxiv.org/abs/2104.09864) in Hugging Face Llama's "rotate_half" layout, so a
  course model converts to `LlamaForCausalLM` by copying weights, without permuting them.
- `KVCache`: keys and values of the tokens already seen, so generation feeds one new token
  per step instead of the whole sequence.
- `MultiHeadAttention`: the layer the GPT uses, with GPT-2's parameter names (`c_attn`, one
  fused q/k/v projection, and `c_proj`), optional RoPE, grouped-query heads, sliding window
  and cache.

Left out (taught elsewhere): multi-head latent attention (week 2, sketch), rolling-buffer
and paged caches with attention sinks (week 7), FlashAttention's tiling (week 7), ALiBi,
cross-attention (the encoder-decoder notebook builds its own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Scaled dot-product attention, by hand
# --------------------------------------------------------------------------------------


def causal_mask(
    t_q: int, t_k: int, sliding_window: int | None = None, device=None
) -> torch.Tensor:
    """(t_q, t_k) boolean mask, True where query i may attend to key j.

    The queries are the *last* t_q of the t_k positions (as when a KV cache holds the first
    t_k - t_q): query i sits at absolute position t_k - t_q + i and sees keys j <= that.
    With a sliding window W it sees only the W most recent keys, itself included
    (Mistral's convention: j > i - W).

    >>> causal_mask(2, 4).int()
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]], dtype=torch.int32)

    subtle: `F.scaled_dot_product_attention(..., is_causal=True)` aligns the triangle to the
    top-left corner, which is wrong when t_q < t_k; PyTorch's
    `torch.nn.attention.bias.causal_lower_right` is the bottom-right version used here.
    """
    if t_q > t_k:
        raise ValueError(f"t_q ({t_q}) cannot exceed t_k ({t_k}): queries are the last keys")
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (t_q, 1) absolute
    k_pos = torch.arange(t_k, device=device)[None, :]  # (1, t_k)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    return mask


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, written out step by step.

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) where nkv divides nh (grouped-query
    attention: each group of nh // nkv query heads shares one key/value head; nkv == 1 is
    multi-query attention). Returns (B, nh, Tq, hs).

    mask: broadcastable to (B, nh, Tq, Tk); boolean (True = may attend, as in PyTorch) or
    float (added to the scores, -inf to forbid). is_causal: bottom-right causal mask (see
    `causal_mask`); it may be combined with `mask`. scale: defaults to 1/sqrt(hs), which keeps
    the scores' variance near 1 so the softmax does not saturate (Vaswani et al., sec. 3.2.1).
    dropout_p: drops attention weights; `generator` makes that dropout repeatable.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (B, heads, T, hs)")
    nh, nkv = q.size(1), k.size(1)
    if v.size(1) != nkv or nh % nkv != 0:
        raise ValueError(f"k/v heads ({nkv}, {v.size(1)}) must be equal and divide q heads ({nh})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if nkv != nh:
        # GQA: repeat each kv head for its group of query heads, as HF Llama's repeat_kv:
        # query head h uses kv head h // (nh // nkv).
        k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
        v = v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, Tk, hs)
    t_q, t_k = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale

    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(t_q, t_k, device=q.device), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    att = F.softmax(scores, dim=-1)  # (B, nh, Tq, Tk), each row sums to 1
    # subtle: a query that may see no key at all (e.g. a padding position) has a row of
    # -inf and softmax gives 0/0 = NaN; PyTorch's SDPA returns zeros there, so do we.
    att = att.masked_fill(scores.isneginf().all(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        keep = torch.rand(att.shape, generator=generator, device=att.device) >= dropout_p
        att = att * keep / (1.0 - dropout_p)  # rescale so the expected value is unchanged
    return att @ v  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs)


# --------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE)
# --------------------------------------------------------------------------------------


def rope_frequencies(
    head_dim: int, max_len: int, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_len, head_dim), for positions 0 .. max_len - 1.

    Pair i of a head (i < head_dim / 2) rotates by angle pos * theta^(-2i / head_dim): fast
    for the first pairs, slow for the last (RoFormer eq. 15). Computed in float32 whatever
    the model's dtype, because bf16 cannot represent large angles precisely.

    Layout "rotate_half" (HF Llama): pair i is (x[i], x[i + head_dim/2]), not the
    interleaved (x[2i], x[2i+1]) of the paper and Meta's code. Both are the same maths on a
    permuted head dimension; using HF's layout makes conversion a plain weight copy.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    pos = torch.arange(max_len, device=device).float()
    angles = torch.outer(pos, inv_freq)  # (max_len, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, head_dim): pair i twice
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its angle.

    cos, sin: (T, hs) for the positions of x's T tokens, or (B, 1, T, hs) when each row of
    the batch has positions of its own (continuous batching, `shared.engine`). Because a
    rotation by angle a followed by the dot product with a vector rotated by b only depends
    on a - b, the attention score q_m . k_n depends on the offset m - n alone (RoFormer
    sec. 3.4).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 activations bf16
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for the tokens seen so far; `pos` counts them.

    Each layer's entry is a pair of tensors (B, nkv, pos, hs). A new chunk of keys is
    appended with `torch.cat` rather than written into a preallocated buffer: simpler to
    read, no maximum length to choose, and at the course's sizes the copy costs little next
    to the attention itself (a preallocated buffer would avoid the O(T) copy per step;
    week 7 builds one, plus a rolling buffer for sliding windows and a paged cache).

    With a sliding window the cache still keeps every key; older ones are only masked out.

    The model advances `pos` after all layers have stored the chunk (`GPT.forward`).
    """

    def __init__(self, n_layer: int, batch_size: int):
        if n_layer < 1 or batch_size < 1:
            raise ValueError(f"n_layer and batch_size must be >= 1, got {n_layer}, {batch_size}")
        self.batch_size = batch_size
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this chunk's k, v (B, nkv, T, hs) to `layer`; return all of them so far."""
        if k.size(0) != self.batch_size:
            raise ValueError(f"cache is for batch size {self.batch_size}, got {k.size(0)}")
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, nkv, pos + T, hs)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: each surviving beam's parent row)."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
        self.batch_size = index.numel()

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding rejects tokens)."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"length must be in [0, {self.pos}], got {length}")
        self.k = [None if t is None else t[:, :, :length] for t in self.k]
        self.v = [None if t is None else t[:, :, :length] for t in self.v]
        self.pos = length

    @property
    def nbytes(self) -> int:
        """Memory the cached keys and values take, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


# --------------------------------------------------------------------------------------
# Multi-head attention
# --------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Causal self-attention with n_head query heads and n_kv_head key/value heads.

    `c_attn` projects x (B, T, C) to q, k and v at once: the first n_head * hs outputs are
    q, then n_kv_head * hs for k, then the same for v (hs = n_embd // n_head). With
    n_kv_head == n_head this is exactly GPT-2's `c_attn`; for Llama, q_proj, k_proj and
    v_proj are its three row blocks. `c_proj` maps the concatenated heads back to C.

    The forward pass uses PyTorch's fused `F.scaled_dot_product_attention` (FlashAttention
    or memory-efficient kernels where available); set `use_sdpa = False` to run this
    module's hand-written `scaled_dot_product_attention` instead (same result, readable,
    slower). The `config` is a `shared.model.GPTConfig`.
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_size = config.n_embd // config.n_head
        self.sliding_window = config.sliding_window
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache this layer uses
        self.use_sdpa = True
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # Dropout on the attention weights happens inside SDPA (dropout_p); this one is on
        # the output, before it joins the residual stream (as in GPT-2).
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). rope: (cos, sin) for these T positions, or None.

        key_mask: optional (B, Tk) boolean, True where a key is real, for a batch whose rows
        are padded on the *left* (`shared.engine`); Tk counts the cached keys plus these T.
        The causal and window masks then apply in column space, which is right because each
        row's real keys are contiguous and end at the last column.
        """
        B, T, C = x.shape
        hs, nh, nkv = self.head_size, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            # Rotate q and k *before* caching: a cached key keeps the rotation of its own
            # position, so it never needs recomputing.
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, Tk, hs), Tk = past + T
        t_k = k.size(2)

        # The mask. Common cases need none: training (T == Tk) is plain causal, and one new
        # token with no window sees every cached key.
        mask, is_causal = None, False
        if key_mask is not None:
            if key_mask.shape != (B, t_k) or key_mask.dtype != torch.bool:
                raise ValueError(f"key_mask must be a bool tensor of shape {(B, t_k)}, got "
                                 f"{key_mask.dtype} {tuple(key_mask.shape)}")
            mask = causal_mask(T, t_k, self.sliding_window, device=x.device)  # (T, Tk)
            mask = mask & key_mask[:, None, None, :]  # (B, 1, T, Tk): no padding key is seen
        elif self.sliding_window is not None and t_k > self.sliding_window:
            mask = causal_mask(T, t_k, self.sliding_window, device=x.device)
        elif T == t_k:
            is_causal = T > 1
        elif T > 1:
            mask = causal_mask(T, t_k, device=x.device)  # bottom-right, see causal_mask

        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                enable_gqa=nkv != nh,
            )
        else:
            y = scaled_dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))
