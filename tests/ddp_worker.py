"""A tiny training run for tests/test_train.py, with or without torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT
    python tests/ddp_worker.py OUT          # the same run in one process

Rank 0 saves the per-step losses, grad norms, val losses and final weights to OUT
(torch.save). The tiny model and data also serve test_train.py's other tests.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from shared.train import TrainConfig, make_get_batch, train

VOCAB = 16


class TinyLM(nn.Module):
    """Embedding -> dropout -> LayerNorm -> Linear: a bigram model with the parameter kinds
    a GPT has (embedding, matrix, bias, norm gain) and a dropout to exercise the RNG."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8, dropout: float = 0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.rows_trained = 0  # rows seen in training mode: shows each DDP rank gets a share

    def forward(self, x, y=None):
        if self.training:
            self.rows_trained += x.size(0)
        logits = self.head(self.ln(self.drop(self.wte(x))))  # (B, T, V)
        loss = None if y is None else F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return logits, loss


def tiny_tokens(n: int = 2000, shift: int = 1, seed: int = 0) -> torch.Tensor:
    """Tokens where the next is (previous + shift) % VOCAB 80% of the time, else random."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(VOCAB, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.8
    out = [0]
    for i in range(1, n):
        out.append((out[-1] + shift) % VOCAB if keep[i] else int(noise[i]))
    return torch.tensor(out)


def tiny_get_batch(block_size: int = 8, val_shift: int = 1):
    """get_batch over tiny_tokens; val_shift != 1 makes validation a different language."""
    return make_get_batch(tiny_tokens(seed=0), tiny_tokens(500, val_shift, seed=1), block_size)


def run(steps: int = 6, grad_accum_steps: int = 2) -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    config = TrainConfig(max_steps=steps, batch_size=8, grad_accum_steps=grad_accum_steps,
                         lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=3, eval_steps=2,
                         progress=False, device="cpu")
    history = train(model, tiny_get_batch(), config)
    return {"train_loss": history.train_loss, "grad_norm": history.grad_norm,
            "val_loss": history.val_loss, "state": model.state_dict(),
            "rows_trained": model.rows_trained}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--grad-accum-steps", type=int, default=2)
    args = parser.parse_args()
    result = run(args.steps, args.grad_accum_steps)
    result["world_size"] = int(os.environ.get("WORLD_SIZE", 1))
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(result, args.out)
