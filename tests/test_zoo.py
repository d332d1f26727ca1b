"""shared.zoo: building, caching, locking and loading recipes.

Every test but the last points the cache at a temporary folder and uses a tiny recipe
(a few optimizer steps, seconds). The last one loads the real "shakespeare-char" from the
default cache (`make test` builds it beforehand; if missing, the test builds it) and
recomputes its validation loss.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shared import zoo
from shared.data import shakespeare_text, train_val_split
from shared.model import GPT, GPTConfig
from shared.tokenizers import CharTokenizer, WordCharTokenizer

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    name="zoo-test",
    description="a few steps of a tiny model, for the tests",
    model=dict(block_size=16, n_layer=1, n_head=2, n_embd=16, positions="rope",
               norm="rmsnorm", mlp="swiglu", bias=False),
    train=dict(max_steps=3, batch_size=4, warmup_steps=1, eval_interval=3, eval_steps=1),
)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny recipe registered, the cache in a temporary folder; both undone after."""
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "RECIPES", dict(zoo.RECIPES))  # registrations stay local
    return zoo.register(zoo.Recipe(**TINY))


@pytest.fixture
def builds(monkeypatch):
    """Counts calls of zoo.train_recipe (the only place that trains)."""
    calls = []
    real = zoo.train_recipe

    def counted(recipe, *args, **kwargs):
        calls.append(recipe.name)
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(zoo, "train_recipe", counted)
    return calls


def test_build_writes_a_complete_entry(tiny, builds, tmp_path):
    model, tok = zoo.load("zoo-test", progress=False)
    folder = zoo.entry_dir("zoo-test")
    assert folder == tmp_path / "zoo" / f"zoo-test-{tiny.hash}" and builds == ["zoo-test"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(zoo.FILES)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []
    meta = json.loads((folder / "config.json").read_text())
    assert meta["recipe"] == json.loads(tiny.to_json()) and meta["recipe_hash"] == tiny.hash
    m = meta["metrics"]
    assert m["steps"] == 3 and 0 <= m["train_seconds"] < 60 and m["torch"] == torch.__version__
    assert 3.0 < m["val_loss"] < 4.6  # a barely trained model: near ln(76) = 4.33
    assert isinstance(model, GPT) and not model.training
    assert model.config.vocab_size == tok.vocab_size == 76
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    assert tok.decode(tok.encode(text)) == text


def test_second_load_is_a_cache_hit(tiny, builds):
    m1, _ = zoo.load("zoo-test", progress=False)
    weights = zoo.entry_dir("zoo-test") / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    m2, _ = zoo.load("zoo-test", progress=False)
    assert builds == ["zoo-test"] and weights.stat().st_mtime_ns == mtime
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # the tie survives safetensors (which stores a shared tensor once)
    assert m2.lm_head.weight.data_ptr() == m2.transformer.wte.weight.data_ptr()


def test_changed_recipe_gets_a_new_entry(tiny, builds):
    old = zoo.build("zoo-test", progress=False)
    reworded = zoo.register(zoo.Recipe(**{**TINY, "description": "new words"}), replace=True)
    assert reworded.hash == tiny.hash and zoo.build("zoo-test", progress=False) == old
    changed = zoo.register(zoo.Recipe(**{**TINY, "seed": 7}), replace=True)
    new = zoo.build("zoo-test", progress=False)
    assert changed.hash != tiny.hash and new != old and old.is_dir() and new.is_dir()
    assert builds == ["zoo-test", "zoo-test"]


def test_same_recipe_same_weights(tiny):
    """Seeded: a forced rebuild reproduces the weights exactly (CPU)."""
    a, _ = zoo.load("zoo-test", progress=False)
    zoo.build("zoo-test", force=True, progress=False)
    b, _ = zoo.load("zoo-test", progress=False)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_save_puts_a_model_trained_elsewhere_into_the_zoo(tiny, builds):
    """zoo.save writes what build would; load then finds it and trains nothing."""
    tok = CharTokenizer.train(shakespeare_text()[:5000])
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, **TINY["model"]))
    folder = zoo.save(tiny, model, tok, {"val_loss": 9.0})
    loaded, loaded_tok = zoo.load("zoo-test", progress=False)
    assert builds == [] and folder == zoo.entry_dir("zoo-test")
    assert zoo.metadata("zoo-test")["metrics"] == {"val_loss": 9.0}
    assert loaded_tok.chars == tok.chars
    for (k, x), (_, y) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), k
    zoo.save(tiny, GPT(model.config), tok, {"val_loss": 8.0})  # replaces the entry
    assert zoo.metadata("zoo-test")["metrics"] == {"val_loss": 8.0}
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_failed_build_leaves_nothing(tiny, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("out of disk")

    monkeypatch.setattr(zoo, "_write_entry", broken)
    with pytest.raises(RuntimeError, match="out of disk"):
        zoo.build("zoo-test", progress=False)
    assert not zoo.is_built("zoo-test")
    assert [p.name for p in (tmp_path / "zoo").iterdir() if not p.name.endswith(".lock")] == []


# Run in two processes at once: each counts its builds in BUILD_LOG, and the build is
# slowed down so the two surely overlap (without the lock both would build).
CONCURRENT = """
import json, os, sys, time
from shared import zoo
zoo.register(zoo.Recipe(**json.loads(sys.argv[1])))
real = zoo.train_recipe
def counted(*args, **kwargs):
    with open(os.environ["BUILD_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(2)
    return real(*args, **kwargs)
zoo.train_recipe = counted
model, tok = zoo.load("zoo-test", progress=False)
print(tok.decode(tok.encode("HAMLET:")), zoo.entry_dir("zoo-test").name)
"""


@pytest.mark.slow
def test_two_processes_build_once(tiny, tmp_path):
    log = tmp_path / "builds.txt"
    env = dict(os.environ, BUILD_LOG=str(log), LLM_COURSE_CACHE=str(tmp_path),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, json.dumps(TINY)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["HAMLET:", f"zoo-test-{tiny.hash}"]
    assert len(log.read_text().split()) == 1


def test_unknown_name_lists_the_known_ones(tiny):
    with pytest.raises(ValueError, match="shakespeare-char"):
        zoo.load("shakespeare-word")


def test_recipe_is_validated():
    with pytest.raises(ValueError, match="n_kv_head"):
        zoo.Recipe(name="bad", description="", model=dict(n_head=4, n_kv_head=3))
    with pytest.raises(ValueError, match="seed"):
        zoo.Recipe(name="bad", description="", train=dict(seed=1))
    with pytest.raises(ValueError, match="data"):
        zoo.Recipe(name="bad", description="", data="wikipedia")
    with pytest.raises(ValueError, match="exists"):
        zoo.register(zoo.Recipe(name="shakespeare-char", description=""))


def test_fine_tuning_recipe_starts_from_its_parent_on_packed_chat_rows(tiny, builds,
                                                                         monkeypatch):
    """init_from: the child trains from the parent's weights on tinyworld-chat rows; the
    parent's hash is part of the child's; a chat model's metrics carry test accuracy."""
    monkeypatch.setattr(zoo, "EVAL_PER_FAMILY", 2)
    small = dict(block_size=320, n_layer=1, n_head=2, n_embd=16, positions="rope",
                 norm="rmsnorm", mlp="swiglu", bias=False)
    zoo.register(zoo.Recipe(name="tw-base", description="", data="tinyworld", model=small,
                            train=dict(max_steps=2, batch_size=2, warmup_steps=1,
                                       eval_interval=2, eval_steps=1)))
    child = zoo.register(zoo.Recipe(name="tw-sft", description="", data="tinyworld-chat",
                                    init_from="tw-base",
                                    train=dict(max_steps=2, batch_size=2, warmup_steps=1,
                                               eval_interval=2, eval_steps=1, lr=1e-9,
                                               min_lr=1e-9)))
    base, tok = zoo.load("tw-base", progress=False)
    sft, _ = zoo.load("tw-sft", progress=False)
    assert builds == ["tw-base", "tw-sft"] and tok.vocab_size == 330
    for a, b in zip(base.parameters(), sft.parameters()):  # lr ~0: the parent's weights
        assert torch.allclose(a, b, atol=1e-6)
    meta = zoo.metadata("tw-sft")
    assert set(meta["metrics"]["test_accuracy"]) >= {"fact_qa", "tool_use", "mean"}
    assert 0 < meta["metrics"]["val_loss"] < 10
    hash_before = child.hash
    zoo.register(zoo.Recipe(name="tw-base", description="", data="tinyworld", model=small,
                            seed=5), replace=True)
    assert child.hash != hash_before  # a new parent means a new child
    with pytest.raises(ValueError, match="init_from"):
        zoo.Recipe(name="bad", description="", init_from="nobody")
    with pytest.raises(ValueError, match="model must be empty"):
        zoo.Recipe(name="bad", description="", init_from="tw-base", model=dict(n_layer=2))
    with pytest.raises(ValueError, match="block_size"):
        zoo.dataset("tinyworld-chat")


def test_tinyworld_pretraining_mixture():
    """The "tinyworld" data set: WordChar ids of biographies grouped by person plus plain-text
    train problems - no held-out person, no val/test problem, no chat token."""
    tok, train_ids, val_ids = zoo.dataset("tinyworld")
    world = zoo.tinyworld()
    assert isinstance(tok, WordCharTokenizer) and train_ids.dtype == torch.long
    assert int(train_ids.max()) < tok.vocab_size and 0.04 < len(val_ids) / len(train_ids) < 0.06
    text = tok.decode(torch.cat([train_ids, val_ids]))
    assert not any(s in text for s in tok.special_tokens)
    assert all(f"Q: {ex.prompt}\nA: {ex.response}" in text
               for ex in world.examples("train", "arithmetic")[:50])
    assert not any(f"Q: {ex.prompt}\n" in text for ex in world.examples("test", "string"))
    assert not any(name in text for name in world.people_in("heldout"))
    someone = world.people_in("train")[0]  # one text holds all of a person's biographies
    assert any(para.count(someone) >= 6 * 5 for para in text.split("\n\n"))

def test_tinyworld_agent_rows_keep_the_test_out(tiny, builds, monkeypatch):
    """The "tinyworld-agent" data set: ReAct traces with the agent's system prompt, no
    held-out person, no test expression; a recipe on it reports accuracy per agent kind."""
    from shared.agent import AGENT_SYSTEM, KINDS
    tok, (x, y), (vx, vy) = zoo.dataset("tinyworld-agent", 256)
    world = zoo.tinyworld()
    text = tok.decode(x.flatten())
    assert text.count(AGENT_SYSTEM) > 1000 and (y != -100).float().mean() < 0.5
    assert not any(name in text for name in world.people_in("heldout"))
    test_exprs = [ex.prompt for ex in world.examples("test", "tool_use")
                  if ex.meta["tool"] == "calculator"]
    assert not any(q in text for q in test_exprs)
    small = dict(block_size=256, n_layer=1, n_head=2, n_embd=16, positions="rope")
    zoo.register(zoo.Recipe(name="tw-base2", description="", data="tinyworld", model=small,
                            train=dict(max_steps=1, batch_size=2, warmup_steps=1,
                                       eval_interval=1, eval_steps=1)))
    zoo.register(zoo.Recipe(name="tw-agent", description="", data="tinyworld-agent",
                            init_from="tw-base2",
                            train=dict(max_steps=1, batch_size=2, warmup_steps=1,
                                       eval_interval=1, eval_steps=1)))
    zoo.load("tw-agent", progress=False)
    acc = zoo.metadata("tw-agent")["metrics"]["agent_test_accuracy"]
    assert set(acc) == {*KINDS, "mean"} and all(0 <= v <= 1 for v in acc.values())


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LLM_COURSE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / "llm-course" / "zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert zoo.cache_dir() == Path.home() / ".cache" / "llm-course" / "zoo"
    monkeypatch.setenv("LLM_COURSE_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c" / "zoo"


def test_command_line(tiny, capsys):
    assert zoo.main(["build", "zoo-test"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert zoo.main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"zoo-test                 {tiny.hash}  built" in out and "shakespeare-char" in out


@pytest.mark.slow
def test_shakespeare_char_beats_nanogpt_baseline():
    """The real zoo model, from the default cache: validation loss <= 1.80 nats per char.

    nanoGPT's laptop recipe reaches 1.875 in the same 100 s of CPU (bench/zoo_recipe.py).
    The loss is recomputed here from the text, not read from the stored metrics.
    """
    model, tok = zoo.load("shakespeare-char", progress=True)
    assert isinstance(tok, CharTokenizer) and not model.training
    _, val_text = train_val_split(shakespeare_text(), 0.1)
    ids = torch.tensor(tok.encode(val_text))  # the tokenizer round trip is part of the check
    T = model.config.block_size
    n = (len(ids) - 1) // T
    x, y = ids[: n * T].view(n, T), ids[1: n * T + 1].view(n, T)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            logits, _ = model(x[i:i + 256])
            total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 256].flatten(),
                                     reduction="sum").item()
    loss = total / (n * T)
    assert loss <= 1.80
    assert loss == pytest.approx(zoo.metadata("shakespeare-char")["metrics"]["val_loss"],
                                 abs=1e-3)
