"""MNIST and Fashion-MNIST DataModules (idx files, in memory).

Files are looked up, in order, under ``data_dir/<MNIST|FashionMNIST>/raw/`` (torchvision's layout), directly
under ``data_dir``, plain or gzipped, and for Fashion-MNIST in Debian's ``dataset-fashion-mnist`` copy in
``/usr/share/datasets/fashion-mnist``. Only when none of these holds the files, and ``download`` is on, are they
downloaded with torchvision (into ``data_dir``): a local copy never costs a network attempt.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from flatlit.data.base import InMemoryDataModule
from flatlit.utils.errors import DataNotFoundError

IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(path: str) -> torch.Tensor:
    """Read an idx file (LeCun's MNIST format, optionally gzipped) into a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataNotFoundError(f"{path}: not an unsigned-byte idx file (bad magic number); re-download it.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataNotFoundError(f"{path}: truncated idx file ({arr.size} values for shape {shape}); re-download it.")
    return torch.from_numpy(arr.reshape(shape).copy())


class _IdxDataModule(InMemoryDataModule):
    folder = "MNIST"
    torchvision_class = "MNIST"
    in_channels = 1
    image_size = 28
    num_classes = 10
    fallback_dirs: tuple[str, ...] = ()

    def _find(self, directory: str, train: bool) -> tuple[str, str] | None:
        found = []
        for name in IDX_FILES[train]:
            for candidate in (name, name + ".gz"):
                path = os.path.join(directory, candidate)
                if os.path.isfile(path):
                    found.append(path)
                    break
        return (found[0], found[1]) if len(found) == 2 else None

    def _local_dirs(self) -> list[str]:
        return [os.path.join(self.data_dir, self.folder, "raw"), self.data_dir]

    def _locate(self, train: bool) -> tuple[str, str]:
        for d in self._local_dirs():
            if (files := self._find(d, train)) is not None:
                return files
        for d in self.fallback_dirs:
            if (files := self._find(d, train)) is not None:
                if getattr(self, "_announced", None) != d:  # one line per DataModule, not one per split
                    self._announced = d
                    rank_zero_info(f"flatlit: {self.folder} not found under {self.data_dir!r}; using the copy in {d}.")
                return files
        hint = " or install Debian's copy with `apt-get install dataset-fashion-mnist`" if self.fallback_dirs else ""
        raise DataNotFoundError(
            f"{self.folder} files {IDX_FILES[train]} not found under {self.data_dir!r} (looked in "
            f"{', '.join(self._local_dirs() + list(self.fallback_dirs))}). Set data.init_args.data_dir to a folder "
            f"holding them, run once with data.init_args.download=true and internet access{hint}."
        )

    def _available(self) -> bool:
        """Whether both splits are on disk, under ``data_dir`` or in a fallback copy (no network)."""
        dirs = self._local_dirs() + list(self.fallback_dirs)
        return all(any(self._find(d, t) for d in dirs) for t in (True, False))

    def prepare_data(self) -> None:
        # a local copy (data_dir or Debian's) is used as it is: download only when no copy has the files
        if not self.download or self._available():
            return
        import torchvision

        try:
            getattr(torchvision.datasets, self.torchvision_class)(self.data_dir, train=True, download=True)
        except Exception as err:  # offline, or the mirrors are down: setup() then names what is missing
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            rank_zero_warn(f"flatlit: could not download {self.folder} ({type(err).__name__}: {first}).")

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lbl_path = self._locate(train)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataNotFoundError(
                f"{img_path}: expected N×H×W images and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}."
            )
        return images[:, None], labels.long()


class MNISTDataModule(_IdxDataModule):
    """MNIST (LeCun et al. 1998), 60k/10k 28×28 grey digits; normalisation (0.1307, 0.3081)."""

    dataset_name = "mnist"


class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747); offline fallback to Debian's copy."""

    dataset_name = "fashion_mnist"
    folder = "FashionMNIST"
    torchvision_class = "FashionMNIST"
    fallback_dirs = (DEBIAN_FASHION_MNIST,)
