"""shared.train: config checks, schedule, decay groups, accumulation, exact resume, DDP."""

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.train import (
    History,
    TrainConfig,
    accumulate_gradients,
    configure_optimizer,
    evaluate,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
# The tiny model and data live in the DDP worker script, so both sides train the same thing.
_spec = importlib.util.spec_from_file_location("ddp_worker",
                                               Path(__file__).with_name("ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
TinyLM = worker.TinyLM


def small_config(**overrides) -> TrainConfig:
    base = dict(max_steps=10, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                eval_interval=5, eval_steps=2, progress=False, device="cpu")
    return TrainConfig(**{**base, **overrides})


# --- config ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_steps", 0), ("max_steps", 2.5), ("batch_size", 0), ("grad_accum_steps", 0),
    ("batch_size", True), ("lr", 0.0), ("lr", float("nan")), ("min_lr", -1e-4),
    ("min_lr", 1.0), ("warmup_steps", -1), ("lr_decay_steps", 5), ("weight_decay", -0.1),
    ("beta1", 1.0), ("beta2", -0.1), ("grad_clip", -1.0), ("eval_interval", 0),
    ("eval_steps", 0), ("early_stopping_patience", 0), ("dtype", "float16"),
    ("checkpoint_interval", 0), ("seed", -1), ("device", "gpu"), ("restore_best", "yes"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    # lr_decay_steps=5 is below warmup_steps=10 here
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} "):
        TrainConfig(**{"warmup_steps": 10, field: value})


def test_batch_size_must_split_into_micro_batches():
    with pytest.raises(ValueError, match="batch_size.*grad_accum_steps=3"):
        TrainConfig(batch_size=8, grad_accum_steps=3)
    assert TrainConfig(batch_size=8, grad_accum_steps=4).grad_accum_steps == 4


def test_defaults_follow_max_steps_through_replace():
    config = dataclasses.replace(TrainConfig(max_steps=100), max_steps=300)
    assert config.decay_steps == 300 and config.save_every == config.eval_interval


# --- schedule and optimizer -----------------------------------------------------------

def test_lr_schedule_warmup_peak_cosine_floor():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_decay_steps=110, max_steps=200)
    warm = [lr_at(s, c) for s in range(11)]
    assert warm[0] == pytest.approx(1 / 11)  # the first update already has a nonzero lr
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert steps == pytest.approx([1 / 11] * 10)  # linear
    assert lr_at(10, c) == 1.0 == max(lr_at(s, c) for s in range(200))  # peak at warmup end
    assert lr_at(60, c) == pytest.approx(0.55)  # cosine midpoint: halfway between lr and min_lr
    assert lr_at(35, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, c) == pytest.approx(0.1) and lr_at(199, c) == 0.1  # floor, then flat
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, c)


def test_lr_schedule_equals_torch_schedulers():
    # Reference: torch's LinearLR (warmup) followed by CosineAnnealingLR (decay).
    c = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=7, lr_decay_steps=40, max_steps=40)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.lr)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, 1 / (c.warmup_steps + 1), 1.0,
                                               total_iters=c.warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.decay_steps - c.warmup_steps,
                                                        eta_min=c.min_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], [c.warmup_steps])
    ours, theirs = [], []
    for step in range(c.decay_steps + 1):
        ours.append(lr_at(step, c))
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_decay_groups_hold_exactly_the_matrices():
    model = TinyLM()
    model.ln.bias.requires_grad_(False)  # frozen parameters are not optimized at all
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.3))
    decay, no_decay = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == {id(model.wte.weight), id(model.head.weight)}
    assert ids(no_decay["params"]) == {id(model.head.bias), id(model.ln.weight)}
    assert opt.defaults["betas"] == (0.9, 0.95) and not opt.defaults["fused"]


# --- gradient accumulation ------------------------------------------------------------

def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_gradients_equal_full_batch_gradients():
    torch.manual_seed(0)
    model = TinyLM()
    x, y = worker.tiny_get_batch()("train", 8, torch.Generator().manual_seed(0))
    full_loss = accumulate_gradients(model, x, y, 1)
    full = _grads(model)
    model.zero_grad()
    accum_loss = accumulate_gradients(model, x, y, 4)  # 4 micro-steps of 2 rows
    assert accum_loss.item() == pytest.approx(full_loss.item(), abs=1e-6)
    for a, b in zip(_grads(model), full):  # float32 sums in another order: ~1e-8 apart
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        accumulate_gradients(model, x, y, 3)


def test_training_with_accumulation_takes_the_same_steps():
    # Adam is blind to a constant gradient scale, so also compare the grad norms: a missing
    # division by grad_accum_steps would make them 4x larger.
    runs = []
    for k in (1, 4):
        torch.manual_seed(0)
        model = TinyLM()
        runs.append(train(model, worker.tiny_get_batch(), small_config(grad_accum_steps=k)))
    torch.testing.assert_close(runs[1].train_loss, runs[0].train_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(runs[1].grad_norm, runs[0].grad_norm, atol=1e-6, rtol=1e-5)


# --- the loop, evaluation, early stopping ---------------------------------------------

def test_train_lowers_the_loss_and_fills_the_history():
    torch.manual_seed(0)
    model = TinyLM()
    logged = []
    h = train(model, worker.tiny_get_batch(), small_config(max_steps=30, eval_interval=10),
              log_fn=logged.append)
    assert isinstance(h, History)
    assert h.step == list(range(30)) and h.eval_step == [0, 10, 20, 30]
    assert all(len(getattr(h, k)) == 30 for k in ("train_loss", "lr", "grad_norm", "tokens_per_s"))
    assert h.val_ppl == pytest.approx([math.exp(v) for v in h.val_loss])
    assert h.val_loss[0] > math.log(worker.VOCAB) - 0.3  # about uniform at the start
    assert h.val_loss[-1] < h.val_loss[0] - 0.5
    assert h.lr == [lr_at(s, small_config(max_steps=30)) for s in range(30)]
    assert len(logged) == 30 + 4 and logged[1] == {"step": 0, **{
        k: getattr(h, k)[0] for k in ("train_loss", "lr", "grad_norm", "tokens_per_s")}}
    # Evaluations are comparable: the same batches each time, so the same weights give the
    # same number again.
    assert evaluate(model, worker.tiny_get_batch(), small_config()) == h.val_loss[-1]
    assert model.training  # evaluate switched dropout off and back on


def test_bfloat16_autocast_trains_close_to_float32():
    losses = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        h = train(TinyLM(), worker.tiny_get_batch(), small_config(dtype=dtype))
        losses[dtype] = h.train_loss
    assert losses["bfloat16"] != losses["float32"]  # autocast really ran in bfloat16
    # bfloat16 keeps 8 mantissa bits (relative error ~4e-3 per rounding)
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], atol=0.05, rtol=0)


def test_early_stopping_stops_and_restores_the_best_weights(capsys):
    # Validation text follows another rule (+2 instead of +1): once the model learns the
    # training rule, the val loss only gets worse.
    get_batch = worker.tiny_get_batch(val_shift=2)
    config = small_config(max_steps=50, lr=3e-2, warmup_steps=0, eval_interval=1,
                          early_stopping_patience=3, restore_best=True)
    torch.manual_seed(0)
    model = TinyLM()
    h = train(model, get_batch, config)
    assert len(h.step) < 50 and h.eval_step == list(range(len(h.step) + 1))
    best = h.eval_step.index(h.best_step)
    assert len(h.val_loss) - 1 - best == 3  # stopped at the 3rd evaluation without a new best
    assert all(v >= h.best_val_loss for v in h.val_loss[best:])
    assert f"early stopping at step {len(h.step)}" in capsys.readouterr().out
    # restore_best: the model is back at the best evaluation's weights (same val batches).
    assert evaluate(model, get_batch, config) == h.best_val_loss != h.val_loss[-1]
    # Without patience, the same run goes the distance.
    torch.manual_seed(0)
    h = train(TinyLM(), get_batch, dataclasses.replace(config, early_stopping_patience=None,
                                                       restore_best=False, max_steps=12))
    assert len(h.step) == 12


# --- checkpoints and exact resume -----------------------------------------------------

def test_resume_continues_bitwise_exactly(tmp_path):
    # Dropout > 0: the resumed run must also restore torch's global RNG state.
    get_batch = worker.tiny_get_batch()
    torch.manual_seed(0)
    straight_model = TinyLM(dropout=0.2)
    straight = train(straight_model, get_batch, small_config(checkpoint_path=tmp_path / "a.pt"))

    # lr_decay_steps is set, so the first half follows the 10-step schedule.
    half = small_config(max_steps=5, lr_decay_steps=10, checkpoint_path=tmp_path / "b.pt")
    torch.manual_seed(0)
    first = train(TinyLM(dropout=0.2), get_batch, half)
    assert len(first.train_loss) == 5 and load_checkpoint(tmp_path / "b.pt")["step"] == 5
    torch.manual_seed(123)  # another init and RNG state: the checkpoint must override both
    resumed_model = TinyLM(dropout=0.2)
    resumed = train(resumed_model, get_batch, dataclasses.replace(half, max_steps=10),
                    resume=True)

    assert resumed.train_loss == straight.train_loss  # bitwise, every step
    assert resumed.grad_norm == straight.grad_norm and resumed.lr == straight.lr
    assert resumed.val_loss == straight.val_loss and resumed.eval_step == [0, 5, 10]
    for k, v in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]  # no temporary files left


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    config = small_config(max_steps=3, checkpoint_path=tmp_path / "none.pt")
    torch.manual_seed(0)
    fresh = train(TinyLM(), worker.tiny_get_batch(), config, resume=True)
    assert "no checkpoint" in capsys.readouterr().out and fresh.step == [0, 1, 2]
    assert load_checkpoint(tmp_path / "none.pt")["step"] == 3
    with pytest.raises(ValueError, match="checkpoint_path"):
        train(TinyLM(), worker.tiny_get_batch(), small_config(), resume=True)


@pytest.mark.parametrize("change, name", [
    (dict(lr=2e-2), "lr"), (dict(seed=1), "seed"), (dict(batch_size=4), "batch_size"),
    (dict(max_steps=20), "decay_steps"),  # lr_decay_steps=None follows max_steps
])
def test_resume_refuses_a_config_that_changes_the_run(tmp_path, change, name):
    config = small_config(max_steps=2, checkpoint_path=tmp_path / "c.pt")
    train(TinyLM(), worker.tiny_get_batch(), config)
    with pytest.raises(ValueError, match=f"cannot resume.*{name}="):
        train(TinyLM(), worker.tiny_get_batch(), dataclasses.replace(config, **change),
              resume=True)
    # Execution details may change: more micro-batches, no progress bar, other intervals.
    ok = dataclasses.replace(config, grad_accum_steps=2, eval_interval=1, checkpoint_interval=1)
    assert train(TinyLM(), worker.tiny_get_batch(), ok, resume=True).step == [0, 1]


def test_failed_checkpoint_write_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    config = small_config(max_steps=2, lr_decay_steps=10, checkpoint_path=path)
    model = TinyLM()
    train(model, worker.tiny_get_batch(), config)
    before = load_checkpoint(path)
    real_save = torch.save

    def save_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are written...
        f.truncate(f.tell() // 2)           # ...half of them survive, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        train(model, worker.tiny_get_batch(), dataclasses.replace(config, max_steps=4),
              resume=True)
    monkeypatch.undo()
    after = load_checkpoint(path)
    assert after["step"] == before["step"] == 2
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the half-written temp file was removed


def test_save_checkpoint_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    save_checkpoint(path, {"a": torch.ones(2)})
    save_checkpoint(path, {"a": torch.zeros(2)})
    assert torch.equal(load_checkpoint(path)["a"], torch.zeros(2))
    assert os.listdir(path.parent) == ["x.pt"]


# --- distributed data parallel --------------------------------------------------------

@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    single = worker.run()  # same model, data, config (2 micro-steps) in this process

    assert ddp["world_size"] == 2
    # Each rank trained on half the rows: 6 steps x 8 rows / 2 processes.
    assert ddp["rows_trained"] == 24 and single["rows_trained"] == 48
    # Not bitwise: the all-reduce adds the two ranks' gradients and losses in another order
    # than one process's sums; float32 rounding (~1e-7 relative) is all that may differ.
    torch.testing.assert_close(ddp["train_loss"], single["train_loss"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ddp["val_loss"], single["val_loss"], atol=1e-6, rtol=0)
    for k, v in single["state"].items():
        torch.testing.assert_close(ddp["state"][k], v, atol=1e-6, rtol=0)


# --- the course's GPT on Shakespeare --------------------------------------------------

def test_trains_a_tiny_gpt_on_shakespeare_characters():
    model_module = pytest.importorskip("shared.model")
    from shared.data import shakespeare_text, train_val_split
    from shared.train import make_get_batch

    text = shakespeare_text()[:200_000]
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    train_ids, val_ids = train_val_split(ids, 0.1)
    torch.manual_seed(0)
    model = model_module.GPT(model_module.GPTConfig(
        vocab_size=len(chars), block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    config = small_config(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5,
                          eval_interval=30, eval_steps=4)
    h = train(model, make_get_batch(train_ids, val_ids, 32), config)
    assert abs(h.val_loss[0] - math.log(len(chars))) < 0.5  # a fresh model is near uniform
    # Seeded run: 4.14 -> 2.99 nats; 0.8 leaves room for other CPUs' float rounding.
    assert h.val_loss[-1] < h.val_loss[0] - 0.8
