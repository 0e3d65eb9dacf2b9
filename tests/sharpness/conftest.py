import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 models run fastest on one thread (and far slower with two on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
