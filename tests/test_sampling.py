"""shared.sampling: decoding strategies against naive references on tiny random models.

References: a naive greedy loop that re-runs the whole (cropped) sequence each step, the
filtered distributions computed by hand, and exhaustive search over every continuation.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from shared.model import GPT, GPTConfig
from shared.sampling import (
    apply_repetition_penalty,
    beam_search,
    generate,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)

CONFIGS = {
    "learned": dict(),
    "sinusoidal": dict(positions="sinusoidal"),
    "rope-gqa": dict(positions="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False),
    "rope-window": dict(positions="rope", n_kv_head=1, sliding_window=5),
}


def tiny(vocab_size=32, **overrides) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=32,
                    tie_weights=False, **overrides)
    model = GPT(cfg)
    with torch.no_grad():  # logits with std ~1 rather than ~0.1: no near-ties for argmax
        model.lm_head.weight.mul_(10.0)
    return model.eval()


def prompt(B=2, T=5, V=32, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def naive_greedy(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


# ------------------------------------------------------------------ greedy and cache


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_with_and_without_cache_equals_naive_loop(name):
    model = tiny(**CONFIGS[name])
    idx = prompt()
    n = 20  # 5 + 20 > block_size 16: the cached path must fall back past the block
    with torch.no_grad():
        ref = naive_greedy(model, idx, n)
    assert torch.equal(generate(model, idx, n, temperature=0, use_cache=True), ref)
    assert torch.equal(generate(model, idx, n, temperature=0, use_cache=False), ref)


def test_top_k_1_equals_greedy():
    model = tiny()
    idx = prompt()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 10, top_k=1, generator=g),
                       generate(model, idx, 10, temperature=0))


def test_generate_equals_concatenated_stream_with_the_same_seed():
    model = tiny(**CONFIGS["rope-gqa"])
    idx = prompt()
    kwargs = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    out = generate(model, idx, 12, generator=torch.Generator().manual_seed(7), **kwargs)
    steps = list(stream(model, idx, 12, generator=torch.Generator().manual_seed(7), **kwargs))
    assert all(t.shape == (2,) and t.dtype == torch.long for t in steps)
    assert torch.equal(out, torch.cat([idx] + [t[:, None] for t in steps], dim=1))
    # different seeds, different samples (so the seed really is what made them equal)
    other = generate(model, idx, 12, generator=torch.Generator().manual_seed(8), **kwargs)
    assert not torch.equal(out, other)


def test_sampling_follows_the_model_distribution():
    # One step at temperature 1 with no filter samples from softmax(logits): compare the
    # frequencies of 20000 draws with the probabilities (std of each frequency < 0.004).
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    ids = torch.zeros(20000, 1, dtype=torch.long)
    draws = sample_next(logits, ids, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert (freq - F.softmax(logits[0], -1)).abs().max() < 0.015


def test_generation_restores_training_mode_and_builds_no_graph():
    model = tiny().train()
    out = generate(model, prompt(), 3)
    assert model.training and not out.requires_grad
    it = stream(model, prompt(), 5)
    next(it)
    assert not model.training  # eval while streaming...
    it.close()
    assert model.training  # ...and restored when the caller stops early


# ------------------------------------------------------------------ filters


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15]])  # sorted: .5 .2 .15 .1 .05
    logits = probs.log()
    for p, kept in [(0.5, {1}), (0.6, {1, 3}), (0.7, {1, 3}), (0.86, {1, 3, 4, 0}),
                    (1.0, {0, 1, 2, 3, 4})]:
        filtered = F.softmax(top_p_filter(logits, p), dim=-1)[0]
        assert set(filtered.nonzero().flatten().tolist()) == kept, p
        expected = torch.zeros(5)
        expected[list(kept)] = probs[0, list(kept)] / probs[0, list(kept)].sum()
        assert (filtered - expected).abs().max() < 1e-6

    # random rows: the kept set reaches p, and dropping its least likely member would not
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 100, generator=g) * 2
    probs = F.softmax(logits, -1)
    keep = top_p_filter(logits, 0.9).isfinite()
    mass = (probs * keep).sum(-1)
    smallest_kept = torch.where(keep, probs, torch.ones_like(probs)).min(-1).values
    assert (mass >= 0.9 - 1e-6).all() and (mass - smallest_kept < 0.9).all()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.0]])
    assert top_k_filter(logits, 2).isfinite().nonzero()[:, 1].tolist() == [1, 3]
    assert top_k_filter(logits, 99).isfinite().all()  # k larger than the vocabulary


def test_repetition_penalty_follows_ctrl_and_lowers_repeated_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.1]])
    ids = torch.tensor([[0, 1, 1]])
    out = apply_repetition_penalty(logits, ids, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 0.1]]))
    before, after = F.softmax(logits, -1), F.softmax(out, -1)
    assert (after[0, :2] < before[0, :2]).all() and (after[0, 2:] > before[0, 2:]).all()

    # In generation: with a strong penalty a greedy model repeats itself less.
    model = tiny()
    idx = prompt(B=4)
    plain = generate(model, idx, 15, temperature=0)[:, 5:]
    penal = generate(model, idx, 15, temperature=0, repetition_penalty=3.0)[:, 5:]
    def repeats(x):
        return sum(len(r) - len(set(r)) for r in x.tolist())
    assert repeats(penal) < repeats(plain)


# ------------------------------------------------------------------ stop


def test_stop_ends_each_row_and_generation():
    model = tiny()
    idx = prompt(B=2)
    free = generate(model, idx, 12, temperature=0)
    stop_id = free[0, 5 + 3].item()  # the 4th token row 0 generates
    out = generate(model, idx, 12, temperature=0, stop=[stop_id, 31])

    def first_stop(row):  # index of the first stop token among the generated ones, or None
        return next((i for i, t in enumerate(row.tolist()) if t in (stop_id, 31)), None)

    ends = [first_stop(free[r, 5:]) for r in range(2)]
    # generation stops once every row has stopped (or at 12 tokens)
    n = max(12 if e is None else e + 1 for e in ends)
    assert out.shape == (2, 5 + n)
    for r, e in enumerate(ends):
        if e is None:
            assert torch.equal(out[r], free[r, :5 + n])
        else:  # identical up to the stop token, then the stop token repeated as padding
            assert torch.equal(out[r, :5 + e + 1], free[r, :5 + e + 1])
            assert (out[r, 5 + e:] == free[r, 5 + e]).all()
    for same in (stop_id, [stop_id], torch.tensor(stop_id), torch.tensor([stop_id, 31])):
        assert generate(model, idx[:1], 12, temperature=0, stop=same).shape == (1, 5 + 4)


# ------------------------------------------------------------------ beam search


def test_beam_search_with_one_beam_is_greedy():
    model = tiny(**CONFIGS["rope-gqa"])
    idx = prompt(B=1)
    greedy = generate(model, idx, 14, temperature=0)
    seq, _ = beam_search(model, idx, 14, num_beams=1)
    assert torch.equal(seq, greedy)
    eos = greedy[0, 5 + 2].item()
    seq, _ = beam_search(model, idx, 14, num_beams=1, eos_id=eos)
    assert torch.equal(seq, generate(model, idx, 14, temperature=0, stop=eos))


def sequence_logprob(model, idx, continuation):
    full = torch.cat([idx, continuation], dim=1)
    with torch.no_grad():
        logp = F.log_softmax(model(full)[0][:, :-1].float(), -1)
    T = idx.size(1)
    return logp[:, T - 1:].gather(-1, full[:, T:, None]).sum((-2, -1))  # (B,)


def test_beam_search_wide_enough_is_exhaustive_search():
    # With V=8 and 3 new tokens, 64 beams keep every 2-token prefix, so beam search must
    # find the single most likely of all 8^3 continuations; check against brute force.
    model = tiny(vocab_size=8)
    idx = prompt(B=1, V=8)
    everything = torch.tensor(list(itertools.product(range(8), repeat=3)))  # (512, 3)
    scores = sequence_logprob(model, idx.expand(512, -1), everything)
    seq, score = beam_search(model, idx, 3, num_beams=64, length_penalty=0.0)
    assert torch.equal(seq[0, 5:], everything[scores.argmax()])
    assert abs(score - scores.max().item()) < 1e-4
    # a narrower beam scores no better, and its score is the sequence's log-prob / n
    seq4, score4 = beam_search(model, idx, 3, num_beams=4, length_penalty=1.0)
    assert abs(score4 - sequence_logprob(model, idx, seq4[:, 5:]).item() / 3) < 1e-4
    assert score4 <= scores.max().item() / 3 + 1e-6


def test_beam_search_eos_and_cache():
    model = tiny(**CONFIGS["learned"])
    idx = prompt(B=1)
    a = beam_search(model, idx, 15, num_beams=3, eos_id=4, use_cache=True)
    b = beam_search(model, idx, 15, num_beams=3, eos_id=4, use_cache=False)
    assert torch.equal(a[0], b[0]) and abs(a[1] - b[1]) < 1e-4
    seq = a[0][0, 5:].tolist()
    assert 4 not in seq[:-1]  # eos only ever ends a sequence
    assert beam_search(model, idx, 0)[0] is idx


# ------------------------------------------------------------------ arguments


BAD_ARGS = [
    dict(temperature=-0.1), dict(top_k=0), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5),
    dict(repetition_penalty=0.0), dict(max_new_tokens=-1), dict(stop="a"), dict(stop=[1, -2]),
    dict(stop=1.0), dict(stop=True),
    dict(idx=torch.zeros(2, 3)), dict(idx=torch.zeros(3, dtype=torch.long)),
    dict(idx=torch.zeros(2, 0, dtype=torch.long)),
]


@pytest.mark.parametrize("bad", BAD_ARGS, ids=[next(iter(b)) for b in BAD_ARGS])
@pytest.mark.parametrize("fn", [generate, stream])
def test_bad_arguments_raise_value_error(fn, bad):
    model = tiny()
    args = dict(idx=prompt(), max_new_tokens=3) | bad
    with pytest.raises(ValueError):
        fn(model, **args)  # stream raises at once, not at the first next()


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(idx=prompt(B=2)), dict(eos_id=-1),
                                 dict(max_new_tokens=-1)])
def test_beam_search_bad_arguments(bad):
    with pytest.raises(ValueError):
        beam_search(tiny(), **(dict(idx=prompt(B=1), max_new_tokens=3) | bad))


def test_logits_processor_sees_the_growing_ids_and_steers_every_step():
    model, seen = tiny(), []
    idx = torch.tensor([[1, 2, 3]])

    def only_seven(ids, logits):
        seen.append(ids.size(1))
        return torch.full_like(logits, float("-inf")).index_fill(1, torch.tensor([7]), 0.0)

    out = generate(model, idx, 5, temperature=1.0, logits_processor=only_seven,
                   generator=torch.Generator().manual_seed(0))
    assert out[0, 3:].tolist() == [7] * 5 and seen == [3, 4, 5, 6, 7]
    plain = generate(model, idx, 5, temperature=0.0)
    same = generate(model, idx, 5, temperature=0.0, logits_processor=lambda ids, lg: lg)
    assert torch.equal(plain, same)
