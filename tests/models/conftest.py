"""Run these tests on one torch thread: tiny tensors gain nothing from more, and on a busy
machine OpenMP threads waiting on each other made them several times slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
