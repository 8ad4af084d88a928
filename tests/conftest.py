"""Suite-wide fixtures: one torch thread per test (tiny tensors gain nothing from more, and on
a busy 2-core machine OpenMP threads waiting on each other slow tests down several times)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
