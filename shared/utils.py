"""Small helpers every notebook's set-up cell uses: seeds, device, versions.

Kept deliberately tiny: anything a learner should *see* happen lives in the notebooks.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random

import numpy as np
import torch

# The libraries a notebook's environment check reports, in the order printed.
COURSE_LIBRARIES = (
    "torch", "numpy", "tiktoken", "datasets", "transformers", "peft",
    "matplotlib", "safetensors", "tqdm",
)


def seed_everything(seed: int = 1337) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and all GPUs) and return a seeded CPU generator.

    Seeding makes a CPU run repeatable. On a GPU some kernels are still non-deterministic
    unless `torch.use_deterministic_algorithms(True)` is also set; the course does not
    require bit-identical GPU runs.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU.

    `prefer` forces one ("cpu", "cuda", "mps"); the environment variable `COURSE_DEVICE`
    does the same without editing a notebook (CI sets nothing and gets the CPU here).
    """
    prefer = prefer or os.environ.get("COURSE_DEVICE")
    if prefer:
        if prefer not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be one of cpu, cuda, mps; got {prefer!r}")
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def library_versions(names: tuple[str, ...] = COURSE_LIBRARIES) -> dict[str, str]:
    """{name: version} for Python and the given installed distributions ("missing" if absent)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def print_versions(names: tuple[str, ...] = COURSE_LIBRARIES) -> None:
    """Print Python, library versions and the chosen device, one per line."""
    for name, version in library_versions(names).items():
        print(f"{name:>13}: {version}")
    print(f"{'device':>13}: {get_device()}  (torch threads: {torch.get_num_threads()})")
