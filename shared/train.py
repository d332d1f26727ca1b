"""The training loop: nanoGPT's `train.py`, as one function you can call and read.

`train(model, get_batch, config)` trains any `nn.Module` whose `forward(x, y)` returns
`(logits, loss)`. One optimizer step, in the order the code runs it:

1. set the learning rate: linear warmup, then cosine decay to `min_lr` (`lr_at`; the schedule
   of GPT-3 and nanoGPT, after SGDR, Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983);
2. draw one global batch from a seeded generator; under DDP each process keeps its share;
3. forward and backward over `grad_accum_steps` micro-batches, each loss divided by their
   number, so the summed gradients equal the gradient of the whole batch
   (`accumulate_gradients`), optionally under bfloat16 autocast;
4. clip the global gradient norm (Pascanu et al. 2013, https://arxiv.org/abs/1211.5063);
5. AdamW step with weight decay on matrices and embeddings only (`configure_optimizer`;
   Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101);
6. every `eval_interval` steps: mean validation loss on the same fixed batches, perplexity
   = exp(loss), early stopping; every `checkpoint_interval` steps: an atomic checkpoint
   holding everything an *exact* resume needs (weights, AdamW moments, step, history,
   config, the data generator's state and the dropout RNG state).

Launched with `torchrun --nproc_per_node N script.py`, the same call runs distributed data
parallel (DDP): every process holds the whole model, computes the gradient of its share of
each batch, and DDP averages the gradients across processes during backward (all-reduce),
so N processes take the same steps as one process on the whole batch.

Reference: https://github.com/karpathy/nanoGPT/blob/master/train.py

Left out: FSDP / ZeRO (sharding parameters, gradients and optimizer state across processes
so a model larger than one device's memory fits: PyTorch's `FullyShardedDataParallel`,
DeepSpeed), tensor and pipeline parallelism, float16 with a gradient scaler (bfloat16 needs
none), `torch.compile` (compile the model before passing it in), other schedules, and
logging backends: pass `log_fn`, which receives every logged dict (for TensorBoard, wrap
`SummaryWriter.add_scalar`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from shared.data import get_batch as sample_windows
from shared.utils import get_device

DTYPES = ("float32", "bfloat16")

# Fields that define the optimisation itself: resuming a checkpoint under a different value
# would not continue the same run, so `train(..., resume=True)` refuses. The others (max_steps,
# grad_accum_steps, dtype, device, intervals, progress, ...) may change between runs.
RESUME_MUST_MATCH = ("batch_size", "lr", "min_lr", "warmup_steps", "decay_steps",
                     "weight_decay", "beta1", "beta2", "grad_clip", "eval_steps", "seed")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name} must be {allowed}, got {value!r}")


@dataclass
class TrainConfig:
    max_steps: int = 1000            # optimizer steps in total (a resumed run counts on)
    batch_size: int = 32             # sequences per optimizer step, summed over all processes
    grad_accum_steps: int = 1        # micro-batches per step: more = less memory, same result
    lr: float = 1e-3                 # peak learning rate, reached when warmup ends
    min_lr: float = 1e-4             # where the cosine decay ends (about lr / 10, as Chinchilla)
    warmup_steps: int = 100          # linear warmup: early Adam moments are noisy estimates
    lr_decay_steps: int | None = None  # step at which the cosine reaches min_lr; None = max_steps
    weight_decay: float = 0.1        # AdamW's decoupled decay, applied to >= 2-D weights only
    beta1: float = 0.9               # Adam's momentum (first-moment) decay
    beta2: float = 0.95              # second-moment decay; < 0.999 reacts faster (GPT-3, nanoGPT)
    grad_clip: float = 1.0           # largest global gradient norm; 0 = no clipping
    eval_interval: int = 250         # evaluate every this many steps (also at step 0 and the end)
    eval_steps: int = 20             # validation batches averaged per evaluation
    early_stopping_patience: int | None = None  # stop after this many evaluations without a
                                                # new best val loss; None = never stop early
    restore_best: bool = False       # at the end, load the weights of the best evaluation
    dtype: str = "float32"           # "bfloat16": forward under torch.autocast (CPU or GPU)
    checkpoint_path: str | None = None  # file for checkpoints; None = write none
    checkpoint_interval: int | None = None  # steps between checkpoints; None = eval_interval
    seed: int = 1337                 # seeds the data generators and the dropout RNG
    progress: bool = True            # tqdm bar and a line per evaluation (rank 0 only)
    device: str | None = None        # None = shared.utils.get_device(); cuda:LOCAL_RANK in DDP

    def __post_init__(self):
        for name, minimum in (("max_steps", 1), ("batch_size", 1), ("grad_accum_steps", 1),
                              ("warmup_steps", 0), ("eval_interval", 1), ("eval_steps", 1),
                              ("seed", 0)):
            value = getattr(self, name)
            _check(_is_int(value) and value >= minimum, name, f"an int >= {minimum}", value)
        for name in ("lr_decay_steps", "early_stopping_patience", "checkpoint_interval"):
            value, minimum = getattr(self, name), 0 if name == "lr_decay_steps" else 1
            _check(value is None or (_is_int(value) and value >= minimum), name,
                   f"None or an int >= {minimum}", value)
        _check(self.batch_size % self.grad_accum_steps == 0, "batch_size",
               f"divisible by grad_accum_steps={self.grad_accum_steps}", self.batch_size)
        _check(self.decay_steps >= self.warmup_steps, "lr_decay_steps",
               f">= warmup_steps={self.warmup_steps} (None means max_steps)", self.lr_decay_steps)
        _check(_is_number(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        _check(_is_number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr",
               f"a number in [0, lr={self.lr}]", self.min_lr)
        _check(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
               "a number >= 0", self.weight_decay)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 <= value < 1, name, "a number in [0, 1)", value)
        _check(_is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
               "a number >= 0 (0 = off)", self.grad_clip)
        _check(isinstance(self.restore_best, bool), "restore_best", "a bool", self.restore_best)
        _check(isinstance(self.progress, bool), "progress", "a bool", self.progress)
        _check(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        if self.checkpoint_path is not None:  # a str, so the checkpoint's config loads safely
            _check(isinstance(self.checkpoint_path, (str, os.PathLike)), "checkpoint_path",
                   "None or a path", self.checkpoint_path)
            self.checkpoint_path = os.fspath(self.checkpoint_path)
        if self.device is not None:
            try:
                self.device = str(torch.device(self.device))
            except (RuntimeError, TypeError):
                _check(False, "device", "None or a torch device such as 'cpu', 'cuda:0'",
                       self.device)

    # subtle: these resolve None at use time rather than in __post_init__, so that
    # dataclasses.replace(config, max_steps=...) moves the defaults along with max_steps.
    @property
    def decay_steps(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def save_every(self) -> int:
        return self.eval_interval if self.checkpoint_interval is None else self.checkpoint_interval


@dataclass
class History:
    """What a run logged, as parallel lists ready to plot.

    `step[i]` counts the optimizer updates already applied to the weights that produced
    `train_loss[i]` (so the first entry is step 0); `lr[i]` and `grad_norm[i]` belong to the
    update taken from there (grad_norm before clipping); `tokens_per_s` counts the whole
    batch's tokens per second of wall time, all processes together. Evaluations are at
    `eval_step` (0 = before training), with `val_ppl` = exp(val_loss).
    """
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_ppl: list[float] = field(default_factory=list)

    @property
    def best_val_loss(self) -> float:
        return min(self.val_loss) if self.val_loss else math.nan

    @property
    def best_step(self) -> int | None:
        return self.eval_step[self.val_loss.index(min(self.val_loss))] if self.val_loss else None


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of the update taken after `step` updates (step counts from 0).

    Linear warmup to `lr` at step `warmup_steps`, then half a cosine down to `min_lr` at
    `decay_steps`, then constant. E.g. lr=1, min_lr=0, warmup=4, decay=12:
    steps 0..4 -> 0.2 0.4 0.6 0.8 1.0; step 8 -> 0.5; step 12 and later -> 0.0.
    """
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    warmup, decay = config.warmup_steps, config.decay_steps
    if step < warmup:  # (step + 1): the very first update gets lr / (warmup + 1), not 0
        return config.lr * (step + 1) / (warmup + 1)
    if step >= decay:
        return config.min_lr
    progress = (step - warmup) / (decay - warmup)  # 0 at the peak -> 1 at decay_steps
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def configure_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: decay on >= 2-D tensors, none on biases and norm gains.

    Weight decay pulls weights towards zero, a prior that suits matrices (matmul weights,
    embeddings). On a bias or a LayerNorm gain it only drags a shift or a scale towards 0,
    which hurts and regularises nothing useful; Loshchilov & Hutter's decoupled AdamW and
    nanoGPT's `configure_optimizers` decay only the >= 2-D tensors. Frozen parameters
    (requires_grad=False, e.g. a LoRA base) are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) ones once
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel updates every tensor in one launch instead of a few per tensor.
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, config),
                             betas=(config.beta1, config.beta2), fused=fused)


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=dtype == "bfloat16")


def accumulate_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         grad_accum_steps: int = 1, dtype: str = "float32") -> torch.Tensor:
    """Forward and backward over (x, y) in `grad_accum_steps` equal micro-batches.

    Adds to every `.grad` the gradient of the mean loss over the whole batch and returns
    that loss (detached). Each micro-batch's mean loss is divided by the number of
    micro-batches: the mean of k equal-sized means is the mean over the whole batch, and
    gradients add up over backward calls. Subtle: this is exact only if every micro-batch
    counts the same number of targets; labels masked with -100 break the equality.
    """
    if grad_accum_steps < 1 or x.size(0) % grad_accum_steps:
        raise ValueError(f"batch of {x.size(0)} rows does not split into "
                         f"grad_accum_steps={grad_accum_steps} equal micro-batches")
    micro = x.size(0) // grad_accum_steps
    total = torch.zeros((), device=x.device)
    for i, (xb, yb) in enumerate(zip(x.split(micro), y.split(micro))):
        # DDP all-reduces gradients in every backward; only the last micro-batch needs it.
        last = i == grad_accum_steps - 1
        sync = nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with _autocast(x.device, dtype):
                _, loss = model(xb, yb)  # xb, yb: (B/k, T)
            loss = loss.float() / grad_accum_steps
            loss.backward()
        total += loss.detach()
    return total


# --- data and processes ---------------------------------------------------------------

def make_get_batch(train_data, val_data, block_size: int):
    """A `get_batch(split, batch_size, generator)` for `train`: random next-token windows
    of `block_size` from two 1-D token sequences (see `shared.data.get_batch`)."""
    data = {"train": train_data, "val": val_data}

    def get_batch(split: str, batch_size: int, generator: torch.Generator):
        return sample_windows(data[split], batch_size, block_size, generator=generator)

    return get_batch


def split_generator(config: TrainConfig, split: str) -> torch.Generator:
    """A CPU generator seeded for `split` ("train": seed, "val": seed + 1).

    The training generator lives through the run (and in its checkpoints); evaluation makes
    a fresh one each time, so every evaluation draws the same validation batches.
    """
    offset = {"train": 0, "val": 1}.get(split)
    if offset is None:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return torch.Generator().manual_seed(config.seed + offset)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    _, world = _rank_and_world()
    if world > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        t /= world
    return t


def _local_batch(get_batch, split, config, generator, device):
    """This process's rows of the global batch, on `device`."""
    x, y = get_batch(split, config.batch_size, generator)  # (B, T): identical on every rank
    if x.size(0) != config.batch_size or y.size(0) != config.batch_size:
        raise ValueError(f"get_batch returned {x.size(0)} rows for batch_size "
                         f"{config.batch_size}")
    rank, world = _rank_and_world()
    # Rank r keeps rows r, r + world, ...: disjoint shares that together are the whole batch.
    return x[rank::world].to(device), y[rank::world].to(device), x.numel()


@torch.no_grad()
def evaluate(model: nn.Module, get_batch, config: TrainConfig, split: str = "val") -> float:
    """Mean loss over `config.eval_steps` batches of `split` (dropout off).

    The generator is re-seeded at every call, so every evaluation sees the same batches and
    two evaluations differ only because the model changed. Under DDP each process scores
    its rows and the means are averaged across processes.
    """
    device = next(model.parameters()).device
    generator = split_generator(config, split)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(config.eval_steps):
        x, y, _ = _local_batch(get_batch, split, config, generator, device)
        micro = x.size(0) // config.grad_accum_steps  # the training micro-batch fits memory
        for xb, yb in zip(x.split(micro), y.split(micro)):
            with _autocast(device, config.dtype):
                _, loss = model(xb, yb)
            total += loss.float()
    model.train(was_training)
    n = config.eval_steps * config.grad_accum_steps
    return _mean_over_ranks(total / n).item()


def _setup_distributed(config: TrainConfig) -> tuple[torch.device, bool]:
    """Pick the device; join the process group if torchrun started us. Returns (device, created).

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and where to meet) in each process's
    environment; `init_process_group` reads them. gloo runs collectives on CPU tensors,
    NCCL on CUDA tensors (one GPU per process: cuda:LOCAL_RANK).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    distributed = dist.is_available() and (dist.is_initialized() or launched)
    device = torch.device(config.device) if config.device else get_device()
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = distributed and not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, created


# --- checkpoints ----------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` with torch.save, atomically: readers see the old file or the new one.

    The bytes go to a temporary file in the same folder (so the rename stays on one file
    system), are forced to disk (fsync), and only then `os.replace` swaps the file in; a
    crash or an error mid-write leaves the previous checkpoint intact.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself survive a power cut
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU; weights_only=True unpickles tensors and plain data only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _check_resumable(saved: TrainConfig, config: TrainConfig) -> None:
    for name in RESUME_MUST_MATCH:
        old, new = getattr(saved, name), getattr(config, name)
        if old != new:
            raise ValueError(
                f"cannot resume: the checkpoint was trained with {name}={old!r}, the config "
                f"says {new!r}; resuming would not continue the same run. (If this is "
                f"decay_steps: set lr_decay_steps explicitly when you plan to train longer.)")


def _stop_early(history: History, patience: int | None) -> bool:
    """True when the last `patience` evaluations brought no new best val loss."""
    if patience is None or not history.val_loss:
        return False
    best = history.val_loss.index(min(history.val_loss))  # the first evaluation at the minimum
    return len(history.val_loss) - 1 - best >= patience


# --- the loop -------------------------------------------------------------------------

def train(model: nn.Module, get_batch: Callable, config: TrainConfig, resume: bool = False,
          log_fn: Callable[[dict], None] | None = None) -> History:
    """Train `model` in place for `config.max_steps` optimizer steps and return its History.

    `get_batch(split, batch_size, generator)` returns CPU tensors (x, y) of `batch_size` rows
    for split "train" or "val". Subtle: it must draw all its randomness from `generator`
    (the trainer owns and checkpoints it), or runs stop being repeatable and resumable.
    `train` seeds torch's global RNG (dropout) from `config.seed` on a fresh start.

    resume=True continues from `config.checkpoint_path` exactly where it stopped (bitwise
    the same losses as an uninterrupted run on the same machine); if the file does not
    exist, training starts fresh. `log_fn`, if given, receives every logged dict (one per
    step, one per evaluation) on rank 0: the hook for TensorBoard, W&B or a CSV file.
    """
    device, created_group = _setup_distributed(config)
    try:
        return _train(model, get_batch, config, resume, log_fn, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(model, get_batch, config, resume, log_fn, device) -> History:
    rank, world = _rank_and_world()
    is_main = rank == 0

    def log(message: str) -> None:
        if is_main:
            tqdm.write(message)

    if config.batch_size % (config.grad_accum_steps * world):
        raise ValueError(f"batch_size={config.batch_size} must divide evenly into "
                         f"grad_accum_steps={config.grad_accum_steps} x world size {world}")
    raw_model = model.to(device)
    raw_model.train()
    torch.manual_seed(config.seed + rank)  # dropout masks: repeatable, different per rank
    generator = split_generator(config, "train")
    history, start_step, best_state, ckpt = History(), 0, None, None

    if resume:
        if config.checkpoint_path is None:
            raise ValueError("resume=True needs config.checkpoint_path")
        if os.path.exists(config.checkpoint_path):
            ckpt = load_checkpoint(config.checkpoint_path)
            _check_resumable(TrainConfig(**ckpt["config"]), config)
            raw_model.load_state_dict(ckpt["model"])
        else:
            log(f"resume: no checkpoint at {config.checkpoint_path}; starting fresh")

    # DDP broadcasts rank 0's weights at construction and registers the all-reduce hooks.
    ddp_ids = [device.index] if device.type == "cuda" else None
    model = DDP(raw_model, device_ids=ddp_ids) if world > 1 else raw_model
    optimizer = configure_optimizer(raw_model, config)

    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, history = ckpt["step"], History(**ckpt["history"])
        generator.set_state(ckpt["generators"]["train"])
        rng = ckpt["rng_states"]
        if len(rng) == world:
            torch.set_rng_state(rng[rank]["cpu"])
            if rng[rank]["cuda"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state(rng[rank]["cuda"], device)
        else:
            log(f"resume: checkpoint from {len(rng)} processes, now {world}; dropout masks "
                "will differ from an uninterrupted run")
        best_state = ckpt["best_model"]
        log(f"resumed from {config.checkpoint_path} at step {start_step}")

    def run_evaluation(step: int) -> None:
        nonlocal best_state
        val_loss = evaluate(raw_model, get_batch, config, "val")
        improved = not history.val_loss or val_loss < min(history.val_loss)
        history.eval_step.append(step)
        history.val_loss.append(val_loss)
        history.val_ppl.append(math.exp(val_loss))
        if config.restore_best and improved:
            best_state = {k: v.detach().to("cpu", copy=True)
                          for k, v in raw_model.state_dict().items()}
        if is_main and log_fn is not None:
            log_fn({"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        if config.progress:
            log(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")

    def save(step: int) -> None:
        rng_states = [None] * world  # every rank's dropout RNG: a collective, all ranks call it
        if world > 1:
            dist.all_gather_object(rng_states, _rng_state(device))
        else:
            rng_states = [_rng_state(device)]
        if is_main:
            save_checkpoint(config.checkpoint_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "history": asdict(history), "config": asdict(config),
                "generators": {"train": generator.get_state()}, "rng_states": rng_states,
                "best_model": best_state,
            })

    if ckpt is None:
        run_evaluation(0)  # the "before" number: about ln(vocab_size) for a fresh model
    if _stop_early(history, config.early_stopping_patience):
        log("the checkpoint's run had already stopped early; nothing to do")
        start_step = config.max_steps

    bar = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not (config.progress and is_main))
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf  # inf: measure only
    for step in range(start_step, config.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x, y, n_tokens = _local_batch(get_batch, "train", config, generator, device)
        loss = accumulate_gradients(model, x, y, config.grad_accum_steps, config.dtype)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = _mean_over_ranks(loss).item()  # .item() waits for the device: timing is honest
        tokens_per_s = n_tokens / (time.perf_counter() - t0)
        record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": tokens_per_s}
        for key, value in record.items():
            getattr(history, key).append(value)
        if is_main and log_fn is not None:
            log_fn(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)

        done = step + 1  # updates applied so far
        if done % config.eval_interval == 0 or done == config.max_steps:
            run_evaluation(done)
        stop = _stop_early(history, config.early_stopping_patience)
        last = stop or done == config.max_steps
        if config.checkpoint_path is not None and (done % config.save_every == 0 or last):
            save(done)
        if stop:
            log(f"early stopping at step {done}: no better val loss in "
                f"{config.early_stopping_patience} evaluations (best {history.best_val_loss:.4f} "
                f"at step {history.best_step})")
            break
    bar.close()

    if config.restore_best and best_state is not None:
        raw_model.load_state_dict(best_state)
        log(f"restored the weights of step {history.best_step} "
            f"(val loss {history.best_val_loss:.4f})")
    return history
