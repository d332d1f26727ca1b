"""shared.plotting: each function returns labelled axes with the expected lines and images."""

import matplotlib

matplotlib.use("Agg")  # no display: render off-screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from shared.plotting import (  # noqa: E402
    plot_attention,
    plot_attention_grid,
    plot_loss_curves,
    plot_lr_schedule,
)
from shared.train import History, TrainConfig, lr_at  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _history(offset=0.0):
    steps = list(range(20))
    return History(step=steps, train_loss=[3 - 0.1 * s + offset for s in steps],
                   lr=[1e-3] * 20, grad_norm=[1.0] * 20, tokens_per_s=[1e4] * 20,
                   eval_step=[0, 10, 20], val_loss=[3.1, 2.2, 1.4], val_ppl=[22.2, 9.0, 4.1])


def test_loss_curves_of_one_run():
    h = _history()
    ax = plot_loss_curves(h)
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats/token)"
    assert ax.get_title() and ax.get_yscale() == "linear"
    train_line, val_line = ax.get_lines()
    assert list(train_line.get_xdata()) == h.step and list(train_line.get_ydata()) == h.train_loss
    assert list(val_line.get_xdata()) == h.eval_step and list(val_line.get_ydata()) == h.val_loss
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]
    ax.figure.canvas.draw()  # renders without error


def test_loss_curves_of_several_runs_on_given_axes_with_log_scale():
    fig, ax = plt.subplots()
    out = plot_loss_curves({"small": _history(), "big": _history(0.5)}, ax=ax, log_y=True)
    assert out is ax and ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["small train", "small val", "big train", "big val"]
    lines = ax.get_lines()  # each run's train and val share one colour
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    with pytest.raises(ValueError, match="History"):
        plot_loss_curves({})


def test_lr_schedule_plot_traces_lr_at():
    config = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    ax = plot_lr_schedule(config)
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [lr_at(s, config) for s in range(100)]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "learning rate"


def test_attention_heatmap_with_token_labels_and_colourbar():
    w = torch.softmax(torch.randn(5, 5).masked_fill(torch.ones(5, 5).triu(1).bool(), -1e9), -1)
    tokens = ["The", " cat", " sat", "\n", "!"]
    ax = plot_attention(w, tokens, title="head 0")
    assert len(ax.images) == 1 and np.allclose(ax.images[0].get_array(), w.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["The", " cat", " sat", "\\n", "!"]
    assert len(ax.get_yticklabels()) == 5
    assert ax.get_xlabel().startswith("key") and ax.get_ylabel().startswith("query")
    assert ax.get_title() == "head 0"
    assert len(ax.figure.axes) == 2  # the heatmap and its colourbar
    with pytest.raises(ValueError, match="2-D"):
        plot_attention(w[None])
    with pytest.raises(ValueError, match="tokens"):
        plot_attention(w, tokens[:3])


def test_attention_grid_is_layers_by_heads():
    weights = torch.softmax(torch.randn(2, 3, 4, 4), -1)  # (L, H, T, T)
    axes = plot_attention_grid(weights, tokens=list("abcd"))
    assert axes.shape == (2, 3)
    assert all(len(ax.images) == 1 for ax in axes.flat)
    assert np.allclose(axes[1, 2].images[0].get_array(), weights[1, 2].numpy())
    fig = axes[0, 0].figure
    assert len(fig.axes) == 2 * 3 + 1  # one shared colourbar
    assert fig.get_suptitle()
    # transformers' output_attentions: a tuple of (1, H, T, T) per layer
    axes = plot_attention_grid(tuple(w[None] for w in weights))
    assert axes.shape == (2, 3)
    with pytest.raises(ValueError, match="L, H, T, T"):
        plot_attention_grid(torch.rand(2, 4, 4))
