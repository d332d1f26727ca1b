"""shared.utils: seeds make runs repeatable; device choice; versions."""

import random

import numpy as np
import pytest
import torch

from shared.utils import get_device, library_versions, seed_everything


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats_python_numpy_and_torch():
    seed_everything(123)
    first = _draw()
    seed_everything(123)
    assert _draw() == first
    seed_everything(124)
    assert _draw() != first


def test_seed_everything_returns_a_seeded_generator():
    a = torch.rand(4, generator=seed_everything(7))
    b = torch.rand(4, generator=seed_everything(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_get_device(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    assert get_device().type in ("cpu", "cuda", "mps")
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        get_device("tpu")


def test_library_versions_reports_installed_and_missing():
    versions = library_versions(("torch", "surely-not-installed-xyz"))
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["surely-not-installed-xyz"] == "missing"
    assert versions["python"].count(".") == 2
