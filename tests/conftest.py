"""Suite-wide fixtures: one torch thread per test (tiny tensors gain nothing from more, and on
a busy 2-core machine OpenMP threads waiting on each other slow tests down several times)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not pass or fail by luck); set
# PRUNEKIT_HYPOTHESIS=explore to draw new ones, as when hunting for bugs with
# PRUNEKIT_DAG_EXAMPLES=25 (25x the examples of tests/graph/test_random_dags.py).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("PRUNEKIT_HYPOTHESIS", "fixed"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
