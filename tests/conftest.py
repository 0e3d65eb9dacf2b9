import os

import pytest
import torch

from tests.fakedata import make_cifar, make_mnist

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)  # the tests use tiny models: one thread is fastest, and robust on a busy 2-core machine


@pytest.fixture
def mnist_dir(tmp_path):
    d = tmp_path / "mnist"
    make_mnist(str(d))
    return str(d)


@pytest.fixture
def cifar_dir(tmp_path):
    d = tmp_path / "cifar"
    make_cifar(str(d))
    make_cifar(str(d), hundred=True)
    return str(d)
