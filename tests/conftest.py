"""Shared test set-up: one torch thread per test process.

The suite runs two test files at a time (`pytest -n 2`) on a 2-core machine. With torch's
default of one intra-op thread per core, the two processes' idle-spinning threads fight
over the cores and small-tensor tests run 5-30x slower; one thread each is the fast setting.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
