"""shared.attention against PyTorch's SDPA and Hugging Face Llama's RoPE.

Tolerances: float32 results are compared to 1e-6 absolute (values are O(1) and both sides
round differently, a few ulps of 1.2e-7 each); float64 to 1e-12.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from shared.attention import (
    KVCache,
    MultiHeadAttention,
    apply_rope,
    causal_mask,
    rope_frequencies,
    scaled_dot_product_attention,
)
from shared.model import GPTConfig

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def qkv(B=2, nh=4, nkv=4, tq=6, tk=6, hs=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, tq, hs, generator=g, dtype=dtype)
    k = torch.randn(B, nkv, tk, hs, generator=g, dtype=dtype)
    v = torch.randn(B, nkv, tk, hs, generator=g, dtype=dtype)
    return q, k, v


def assert_close(a, b, dtype):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
class TestAgainstSDPA:
    def test_no_mask(self, dtype):
        q, k, v = qkv(dtype=dtype)
        assert_close(scaled_dot_product_attention(q, k, v),
                     F.scaled_dot_product_attention(q, k, v), dtype)

    def test_causal(self, dtype):
        q, k, v = qkv(dtype=dtype)
        assert_close(scaled_dot_product_attention(q, k, v, is_causal=True),
                     F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype)

    def test_padding_mask(self, dtype):
        # Row 0 sees all 6 keys, row 1 only the first 4 (two padding keys at the end).
        q, k, v = qkv(dtype=dtype)
        keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
        keep[1, ..., 4:] = False
        out = scaled_dot_product_attention(q, k, v, mask=keep)
        assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), dtype)
        # ...and the padding keys really are ignored: changing their values changes nothing.
        v2 = v.clone()
        v2[1, :, 4:] += 100.0
        assert_close(scaled_dot_product_attention(q, k, v2, mask=keep)[1], out[1], dtype)

    def test_float_mask(self, dtype):
        q, k, v = qkv(dtype=dtype)
        bias = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
        assert_close(scaled_dot_product_attention(q, k, v, mask=bias),
                     F.scaled_dot_product_attention(q, k, v, attn_mask=bias), dtype)

    def test_fully_masked_row_gives_zeros_like_sdpa(self, dtype):
        q, k, v = qkv(dtype=dtype)
        keep = torch.ones(6, 6, dtype=torch.bool)
        keep[0] = False  # query 0 may see nothing
        out = scaled_dot_product_attention(q, k, v, mask=keep)
        assert not out.isnan().any()
        assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), dtype)

    @pytest.mark.parametrize("nkv", [1, 2])
    def test_grouped_query(self, dtype, nkv):
        q, k, v = qkv(nkv=nkv, dtype=dtype)
        out = scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert_close(out, ref, dtype)
        # query head h uses kv head h // (4 // nkv): the layout of HF Llama's repeat_kv
        h = 3
        one = scaled_dot_product_attention(
            q[:, h:h + 1], k[:, h // (4 // nkv):][:, :1], v[:, h // (4 // nkv):][:, :1],
            is_causal=True)
        assert_close(out[:, h:h + 1], one, dtype)

    def test_fewer_queries_than_keys_causal(self, dtype):
        # With a KV cache the 3 queries are the *last* 3 of the 7 positions.
        q, k, v = qkv(tq=3, tk=7, nkv=2, dtype=dtype)
        out = scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = causal_lower_right(3, 7)._materialize()
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert_close(out, ref, dtype)
        # Same as running all 7 queries and keeping the last 3.
        q_full = torch.cat([qkv(tq=4, tk=7, nkv=2, dtype=dtype, seed=5)[0], q], dim=2)
        full = scaled_dot_product_attention(q_full, k, v, is_causal=True)
        assert_close(out, full[:, :, 4:], dtype)

    def test_scale(self, dtype):
        q, k, v = qkv(dtype=dtype)
        out = scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)
        assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1),
                     dtype)
        assert (out - scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() > 1e-2


def test_causal_mask_matches_torch_and_window_definition():
    for t_q, t_k in [(5, 5), (1, 5), (3, 8)]:
        assert torch.equal(causal_mask(t_q, t_k), causal_lower_right(t_q, t_k)._materialize())
    m = causal_mask(3, 8, sliding_window=3)
    for i in range(3):
        pos = 8 - 3 + i  # absolute position of query i
        for j in range(8):
            assert m[i, j].item() == (pos - 3 < j <= pos)
    with pytest.raises(ValueError):
        causal_mask(4, 3)


def test_dropout_is_repeatable_and_unbiased():
    q, k, v = qkv(B=1, tq=4, tk=4)
    run = lambda seed: scaled_dot_product_attention(  # noqa: E731
        q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # Averaged over many masks, inverted dropout leaves the output unchanged in expectation.
    g = torch.Generator().manual_seed(0)
    n = 4000
    out = scaled_dot_product_attention(q.expand(n, -1, -1, -1), k.expand(n, -1, -1, -1),
                                       v.expand(n, -1, -1, -1), dropout_p=0.5, generator=g)
    # per-element std of one draw is about 1, so the mean of 4000 is within ~4/sqrt(4000)
    assert (out.mean(0) - scaled_dot_product_attention(q, k, v)[0]).abs().max() < 0.07


def test_bad_arguments():
    q, k, v = qkv(nkv=3)
    with pytest.raises(ValueError):
        scaled_dot_product_attention(q, k, v)  # 3 kv heads do not divide 4
    q, k, v = qkv()
    with pytest.raises(ValueError):
        scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError):
        scaled_dot_product_attention(q[0], k[0], v[0])


# ------------------------------------------------------------------ RoPE


def test_rope_matches_hugging_face_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )
    hs, T, theta = 16, 12, 500.0
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=T,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    q, k, _ = qkv(B=1, tq=T, tk=T, hs=hs)
    cos_hf, sin_hf = LlamaRotaryEmbedding(cfg)(q, torch.arange(T)[None])
    cos, sin = rope_frequencies(hs, T, theta)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    assert_close(apply_rope(q, cos, sin), q_hf, torch.float32)
    assert_close(apply_rope(k, cos, sin), k_hf, torch.float32)


def test_rope_is_a_complex_rotation_of_half_pairs():
    # RoFormer: pair i is the complex number x[i] + 1j * x[i + hs/2], multiplied by
    # exp(1j * pos * theta^(-2i/hs)).
    hs, T = 8, 5
    x = qkv(B=1, nh=1, tq=T, hs=hs, dtype=torch.float64)[0]
    cos, sin = rope_frequencies(hs, T)
    z = torch.complex(x[..., : hs // 2], x[..., hs // 2:])
    angle = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)
    z = z * torch.polar(torch.ones_like(angle), angle).to(z.dtype)
    expected = torch.cat([z.real, z.imag], dim=-1)
    assert (apply_rope(x, cos.double(), sin.double()) - expected).abs().max() < 1e-6


def test_rope_scores_depend_only_on_relative_offset():
    hs, T, m = 16, 10, 37
    q, k, _ = qkv(B=1, nh=2, nkv=2, tq=T, tk=T, hs=hs)
    cos, sin = rope_frequencies(hs, T + m)

    def scores(start):  # q k^T with every position shifted by `start`
        c, s = cos[start:start + T], sin[start:start + T]
        return apply_rope(q, c, s) @ apply_rope(k, c, s).transpose(-2, -1)

    base = scores(0)
    assert (scores(m) - base).abs().max() < 1e-5
    assert (base - q @ k.transpose(-2, -1)).abs().max() > 0.1  # and RoPE did change them
    with pytest.raises(ValueError):
        rope_frequencies(7, 4)


# ------------------------------------------------------------------ cache and module


def test_kv_cache_append_crop_reorder():
    cache = KVCache(n_layer=2, batch_size=3)
    k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    cache.update(0, k, v)
    k_all, v_all = cache.update(0, k[:, :, :1], v[:, :, :1])
    assert k_all.shape == (3, 2, 5, 8) and torch.equal(k_all[:, :, :4], k)
    cache.pos = 5
    assert cache.nbytes == 2 * 3 * 2 * 5 * 8 * 4
    cache.crop(2)
    assert cache.pos == 2 and cache.k[0].shape == (3, 2, 2, 8) and cache.k[1] is None
    cache.reorder(torch.tensor([2, 2]))
    assert cache.batch_size == 2 and torch.equal(cache.k[0][1], k[2, :, :2])
    with pytest.raises(ValueError):
        cache.update(0, k, v)  # batch 3 into a cache of batch 2
    with pytest.raises(ValueError):
        cache.crop(3)


ATTN_CONFIGS = {
    "mha": dict(),
    "gqa": dict(n_kv_head=2),
    "mqa+rope": dict(n_kv_head=1, positions="rope"),
    "rope+window": dict(n_kv_head=2, positions="rope", sliding_window=3),
}


def make_attention(**overrides):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=4, n_embd=32, **overrides)
    return MultiHeadAttention(cfg), cfg


@pytest.mark.parametrize("name", ATTN_CONFIGS)
def test_module_fast_path_equals_reference_path(name):
    attn, cfg = make_attention(**ATTN_CONFIGS[name])
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    rope = rope_frequencies(8, 9) if cfg.positions == "rope" else None
    fast = attn(x, rope=rope)
    attn.use_sdpa = False
    slow = attn(x, rope=rope)
    assert_close(fast, slow, torch.float32)

    # Chunked with a cache (prefill 5, then 1, then 3) equals the whole sequence, both paths.
    for use_sdpa in (True, False):
        attn.use_sdpa = use_sdpa
        cache, outs, start = KVCache(1, 2), [], 0
        for n in (5, 1, 3):
            r = None if rope is None else (rope[0][start:start + n], rope[1][start:start + n])
            outs.append(attn(x[:, start:start + n], rope=r, cache=cache))
            start += n
            cache.pos = start
        assert_close(torch.cat(outs, dim=1), fast, torch.float32)


def test_module_layout_and_causality():
    attn, _ = make_attention(n_kv_head=2)
    assert attn.c_attn.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert attn.c_proj.weight.shape == (32, 32)
    x = torch.randn(1, 6, 32)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change the future...
    assert torch.allclose(attn(x)[:, :4], attn(x2)[:, :4], atol=1e-6)  # ...past is unchanged
    assert not torch.allclose(attn(x)[:, 4:], attn(x2)[:, 4:], atol=1e-3)
