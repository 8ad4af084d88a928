"""Engine tests use tiny tensors: run them on one intra-op thread.

On small CPU machines a parallel reduction over a 10x3 tensor can cost ~16 ms of thread wake-up
(measured here: log_softmax 16 ms with 2 threads, 0.002 ms with 1), which would dominate every
test. The previous setting is restored after each test.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
