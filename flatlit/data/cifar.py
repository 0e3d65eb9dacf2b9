"""CIFAR-10 and CIFAR-100 DataModules (the python pickle batches, in memory).

Layout (torchvision's): ``data_dir/cifar-10-batches-py/{data_batch_1..5,test_batch}`` and
``data_dir/cifar-100-python/{train,test}``. Missing files are downloaded with torchvision when ``download`` is on.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from flatlit.data.base import InMemoryDataModule
from flatlit.utils.errors import DataNotFoundError


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR batches' dicts of bytes, lists and NumPy arrays and refuses every other global, so a
    doctored batch file cannot run code (the format is a pickle; torchvision reads it with plain ``pickle.load``)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


def read_cifar_batch(path: str) -> dict:
    """One CIFAR batch file (a pickled dict with ``b"data"`` and its labels), read without running code."""
    with open(path, "rb") as f:
        try:
            return _ArraysOnly(f, encoding="bytes").load()
        except pickle.UnpicklingError as err:
            raise DataNotFoundError(f"{path} is not a CIFAR batch file ({err}); download the dataset again.") from None


class _CIFARDataModule(InMemoryDataModule):
    folder = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_key = b"labels"
    torchvision_class = ""
    in_channels = 3
    image_size = 32

    def _paths(self, train: bool) -> list[str]:
        return [os.path.join(self.data_dir, self.folder, f) for f in (self.train_files if train else self.test_files)]

    def prepare_data(self) -> None:
        if all(os.path.isfile(p) for p in self._paths(True) + self._paths(False)) or not self.download:
            return
        import torchvision

        try:
            getattr(torchvision.datasets, self.torchvision_class)(self.data_dir, train=True, download=True)
        except Exception as err:
            rank_zero_warn(f"flatlit: could not download {self.torchvision_class} ({type(err).__name__}: {err}).")

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        data, labels = [], []
        for path in self._paths(train):
            if not os.path.isfile(path):
                raise DataNotFoundError(
                    f"{path} not found. Set data.init_args.data_dir to the folder that contains "
                    f"{self.folder}/, or run once with data.init_args.download=true and internet access."
                )
            batch = read_cifar_batch(path)
            data.append(np.asarray(batch[b"data"], dtype=np.uint8))
            labels.extend(batch[self.label_key])
        images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
        return images, torch.tensor(labels, dtype=torch.long)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32×32 colour images, 10 classes."""

    dataset_name = "cifar10"
    num_classes = 10
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    torchvision_class = "CIFAR10"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32×32 colour images, 100 fine classes; Cutout side 8."""

    dataset_name = "cifar100"
    num_classes = 100
    cutout_size = 8
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = b"fine_labels"
    torchvision_class = "CIFAR100"
