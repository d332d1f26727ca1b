"""Plots the notebooks share: loss curves, the learning-rate schedule, attention heatmaps.

Every function draws with matplotlib's object API (`ax.plot`, `ax.imshow`, ...) on the axes
you pass, or on a new figure, and returns the axes so a notebook can keep decorating them
(`ax.figure` is the figure). Nothing here calls `plt.show()`: Jupyter shows a new figure
when the cell ends. Attention heatmaps follow the layout of the Annotated Transformer and
BertViz's head view: rows are queries (the token attending), columns are keys.

Left out: interactive views (BertViz), smoothing of noisy per-step training losses.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from shared.train import History, TrainConfig, lr_at


def _new_axes(ax, figsize):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _to_numpy(weights) -> np.ndarray:
    """A torch tensor (any device, with grad) or array-like as a float NumPy array."""
    if hasattr(weights, "detach"):
        weights = weights.detach().float().cpu().numpy()
    return np.asarray(weights, dtype=float)


def _label(token: str) -> str:
    return repr(token)[1:-1] if isinstance(token, str) else str(token)  # "\n" shows as \n


def plot_loss_curves(histories: History | dict[str, History], ax=None, log_y: bool = False):
    """Training loss per step (thin) and validation loss per evaluation (dots) of one or
    more runs; `histories` maps a run name to its History. Returns the Axes."""
    if isinstance(histories, History):
        histories = {"": histories}
    if not histories or not all(isinstance(h, History) for h in histories.values()):
        raise ValueError("histories must be a History or a non-empty dict of name -> History")
    ax = _new_axes(ax, (7, 4))
    for name, h in histories.items():
        prefix = f"{name} " if name else ""
        (train_line,) = ax.plot(h.step, h.train_loss, lw=1, alpha=0.5, label=f"{prefix}train")
        if h.val_loss:  # the same colour, so each run's pair reads together
            ax.plot(h.eval_step, h.val_loss, "o-", color=train_line.get_color(), ms=4,
                    label=f"{prefix}val")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_lr_schedule(config: TrainConfig, ax=None):
    """The learning rate of each of `config.max_steps` updates (warmup, cosine, floor).
    Returns the Axes."""
    ax = _new_axes(ax, (6, 3))
    steps = range(config.max_steps)
    ax.plot(steps, [lr_at(s, config) for s in steps], label="lr")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"Warmup ({config.warmup_steps} steps) + cosine decay to {config.min_lr:g}")
    ax.grid(alpha=0.3)
    return ax


def plot_attention(weights, tokens=None, ax=None, title: str | None = None):
    """Heatmap of one head's attention weights (Tq, Tk), with token labels and a colourbar.

    Row i holds how much query token i attends to each key; a causal model's rows are zero
    right of the diagonal. `tokens` labels the keys (and the queries when Tq == Tk; for
    Tq < Tk, as with a KV cache, the queries are the last Tq tokens). Returns the Axes.
    """
    w = _to_numpy(weights)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (Tq, Tk), got shape {w.shape}")
    tq, tk = w.shape
    if tokens is not None and len(tokens) != tk:
        raise ValueError(f"got {len(tokens)} tokens for {tk} keys")
    ax = _new_axes(ax, (0.3 * tk + 2.5, 0.3 * tq + 1.5))
    image = ax.imshow(w, cmap="viridis", vmin=0.0, aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="attention weight")
    if tokens is not None:
        labels = [_label(t) for t in tokens]
        ax.set_xticks(range(tk), labels, rotation=90)
        ax.set_yticks(range(tq), labels[tk - tq:])
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title or "Attention weights")
    return ax


def plot_attention_grid(weights, tokens=None, title: str | None = None):
    """Every head of every layer: a grid of heatmaps, layers as rows and heads as columns.

    `weights` is (L, H, T, T) or a list of L per-layer tensors (H, T, T) or (1, H, T, T),
    as `transformers` returns with `output_attentions=True`. All heatmaps share one colour
    scale and one colourbar. Returns the (L, H) array of Axes.
    """
    layers = [_to_numpy(w) for w in weights]
    layers = [w[0] if w.ndim == 4 and w.shape[0] == 1 else w for w in layers]  # drop batch 1
    if not layers or any(w.ndim != 3 or w.shape != layers[0].shape for w in layers):
        raise ValueError("weights must be (L, H, T, T) or a list of equal (H, T, T) tensors")
    n_layer, (n_head, tq, tk) = len(layers), layers[0].shape
    if tokens is not None and len(tokens) != tk:
        raise ValueError(f"got {len(tokens)} tokens for {tk} keys")
    fig, axes = plt.subplots(n_layer, n_head, figsize=(1.6 * n_head + 1, 1.6 * n_layer + 0.5),
                             squeeze=False, layout="constrained", sharex=True, sharey=True)
    vmax = max(float(w.max()) for w in layers)
    for i, w in enumerate(layers):
        for j in range(n_head):
            ax = axes[i, j]
            image = ax.imshow(w[j], cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"layer {i} head {j}", fontsize=7)
            ax.tick_params(labelsize=6)
    if tokens is not None:  # labels on the outer edge only: sharex/sharey repeat them
        labels = [_label(t) for t in tokens]
        axes[-1, 0].set_xticks(range(tk), labels, rotation=90)
        axes[-1, 0].set_yticks(range(tq), labels[tk - tq:])
    for ax in axes[-1, :]:  # shared tick labels show under every column: rotate each
        ax.tick_params(axis="x", labelrotation=90)
        ax.set_xlabel("key", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("query", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title or "Attention by layer (rows) and head (columns)")
    return axes
