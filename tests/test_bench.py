"""bench/run.py: a smoke test, not a timing test.

Every benchmark runs at its `--quick` sizes with one repeat and must return rows with the
fields the report needs, and the report must render. No timing is asserted: the figures
depend on the machine and its load, and CI does not run the real benchmark (`make bench`).
The benchmarks' own correctness checks still run here: the tiktoken-derived tokenizer must
match tiktoken, the converted model's loss must match ours, and the attention variants must
match PyTorch's SDPA (each raises AssertionError otherwise).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPARE_FIELDS = {"bench", "case", "unit", "course", "peer", "ratio", "goal"}
FIELDS = {
    "tokenizers": COMPARE_FIELDS,
    "training": COMPARE_FIELDS,
    "generation": COMPARE_FIELDS | {"note"},
    "attention": {"bench", "case", "variant", "ms", "peak_mb", "ratio"},
    "serving": {"bench", "case", "mode", "rps", "tok_s", "p50_ms", "p95_ms", "note", "setup"},
    "notebooks": {"bench", "case", "seconds", "note"},
    "batching": COMPARE_FIELDS | {"note"},
}


def test_every_benchmark_is_covered(bench):
    assert set(bench.BENCHMARKS) == set(FIELDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FIELDS if n not in ("serving", "notebooks")])
def test_benchmark_quick(bench, name):
    rows = bench.BENCHMARKS[name](True, 1)
    assert rows
    for row in rows:
        assert FIELDS[name] <= row.keys(), row
        assert row["bench"] == name
        measured = [row[k] for k in ("course", "peer", "ms", "peak_mb") if row.get(k) is not None]
        assert all(math.isfinite(x) and x > 0 for x in measured), row
    if FIELDS[name] >= COMPARE_FIELDS:  # course against peer: a ratio, and a verdict if a goal
        for row in rows:
            assert row["ratio"] > 0
            if row["goal"].startswith((">=", "<=")):
                assert bench.verdict(row) in ("ok", "par (within 5%)", "**BEHIND**"), row


@pytest.mark.slow
def test_serving_quick(bench):
    """Real servers on free ports, a few requests each; both engines, every concurrency."""
    rows = bench.bench_serving(True, 1)
    assert {(r["case"], r["mode"]) for r in rows} == {
        (f"concurrency {c}", m) for c in (1, 4) for m in bench.SERVE_MODES}
    for row in rows:
        assert FIELDS["serving"] <= row.keys(), row
        assert all(math.isfinite(row[k]) and row[k] > 0
                   for k in ("rps", "tok_s", "p50_ms", "p95_ms")), row
        assert row["p50_ms"] <= row["p95_ms"]
        assert (row["mode"] == "continuous") == ("ratio" in row)


def _serving_rows(rps: float) -> list[dict]:
    return [dict(bench="serving", case="concurrency 4", mode=m, max_batch_size=b, rps=rps,
                 tok_s=10 * rps, p50_ms=100.0, p95_ms=200.0, setup="8 requests", note="")
            for m, b in (("continuous", 16), ("one-at-a-time", 1))]


def test_splice_replaces_only_the_rerun_section(bench):
    meta = dict(date="today", wall_s=1.0, machine="m", libraries="l", load_before="0",
                load_after="0", repeats=5)
    slow = dict(bench="training", case="slow", unit="tokens/s", course=1.0, peer=2.0,
                ratio=2.0, goal=">= peer")
    old = bench.render({"training": [slow], "serving": _serving_rows(1.0)}, meta)
    again = dict(meta, date="tomorrow", load_before="9 9 9")
    new = bench.splice(old, {"serving": _serving_rows(3.0)}, again)
    assert "| 4 | continuous (max_batch_size 16) | 3 | 30 |" in new
    assert "| 4 | continuous (max_batch_size 16) | 1 | 10 |" not in new
    assert new.count("## 5. Serving") == 1 and "| slow | tokens/s |" in new
    assert "- re-run alone: serving; on tomorrow" in new and "load average before 9 9 9" in new
    assert "- training: slow (2.00x slower, goal >= peer)" in new  # kept: not re-run
    assert bench.splice(new, {"serving": _serving_rows(3.0)}, again) == new  # idempotent


def test_notebooks_reads_the_times_file(bench, tmp_path):
    missing = bench.bench_notebooks(True, 1, path=ROOT / "build" / "no-such-file.json")
    assert missing[0]["seconds"] is None and "missing" in missing[0]["note"]

    times = tmp_path / "notebook-times.json"
    times.write_text(json.dumps({"seconds": {"week1/a.ipynb": 2.0, "week2/b.ipynb": 5.0},
                                 "total": 7.0}))
    rows = bench.bench_notebooks(True, 1, path=times)
    assert [r["case"] for r in rows] == ["week2/b.ipynb", "week1/a.ipynb", "total"]
    assert rows[-1]["seconds"] == 7.0


def test_report_renders_and_flags_what_is_behind(bench):
    rows = {
        "training": [dict(bench="training", case="fast", unit="tokens/s", course=2.0, peer=1.0,
                          ratio=0.5, goal=">= peer"),
                     dict(bench="training", case="slow", unit="tokens/s", course=1.0, peer=2.0,
                          ratio=2.0, goal=">= peer")],
        "serving": _serving_rows(1.0),
    }
    meta = dict(date="today", wall_s=1.0, machine="m", libraries="l", load_before="0",
                load_after="0", repeats=5)
    report = bench.render(rows, meta)
    assert "| fast | tokens/s | 2 | 1 | 2.00x faster | >= peer | ok |" in report
    assert "- training: slow (2.00x slower, goal >= peer)" in report
    assert "## 5. Serving" in report


def test_splice_adds_a_section_the_report_lacks(bench):
    meta = dict(date="today", wall_s=1.0, machine="m", libraries="l", load_before="0",
                load_after="0", repeats=5)
    slow = dict(bench="training", case="slow", unit="tokens/s", course=1.0, peer=2.0,
                ratio=2.0, goal=">= peer")
    batch = dict(bench="batching", case="continuous", unit="tokens/s", course=3.0, peer=1.0,
                 ratio=1 / 3, goal=">= peer", note="n")
    old = bench.render({"training": [slow]}, meta)
    new = bench.splice(old, {"batching": [batch]}, meta)
    assert new.count("## 7. Batched generation") == 1 and "| slow | tokens/s |" in new
    assert new.index("## 7. Batched") < new.index("## Where the course is behind")
    assert "- training: slow (2.00x slower, goal >= peer)" in new
    assert bench.splice(new, {"batching": [batch]}, meta) == new
