"""Writers of tiny datasets in the real on-disk formats (MNIST idx, CIFAR pickles, JPEG folders)."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np


def write_idx(path: str, array: np.ndarray, gz: bool = False) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_mnist(
    root: str, n_train: int = 240, n_test: int = 60, gz: bool = True, seed: int = 0, layout: str = "flat"
) -> tuple[np.ndarray, np.ndarray]:
    """Write MNIST-format files: ``layout='flat'`` directly in root, ``'torchvision'`` in root/<X>/raw."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    labels = rng.integers(0, 10, n_train + n_test).astype(np.uint8)
    images = rng.integers(0, 64, (n_train + n_test, 28, 28)).astype(np.uint8)
    # make the classes learnable: a bright block whose position encodes the label
    for i, lbl in enumerate(labels):
        images[i, 2 * lbl : 2 * lbl + 6, 4:24] = 255
    write_idx(os.path.join(root, "train-images-idx3-ubyte"), images[:n_train], gz)
    write_idx(os.path.join(root, "train-labels-idx1-ubyte"), labels[:n_train], gz)
    write_idx(os.path.join(root, "t10k-images-idx3-ubyte"), images[n_train:], gz)
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), labels[n_train:], gz)
    return images, labels


def make_cifar(root: str, n_per_batch: int = 40, n_test: int = 50, hundred: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    k = 100 if hundred else 10
    key = b"fine_labels" if hundred else b"labels"

    def dump(path: str, n: int) -> None:
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(path, "wb") as f:
            pickle.dump({b"data": data, key: rng.integers(0, k, n).tolist()}, f)

    if hundred:
        d = os.path.join(root, "cifar-100-python")
        os.makedirs(d, exist_ok=True)
        dump(os.path.join(d, "train"), 5 * n_per_batch)
        dump(os.path.join(d, "test"), n_test)
    else:
        d = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(d, exist_ok=True)
        for i in range(1, 6):
            dump(os.path.join(d, f"data_batch_{i}"), n_per_batch)
        dump(os.path.join(d, "test_batch"), n_test)


def _jpeg(path: str, size: int, rng: np.random.Generator) -> None:
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(path, "JPEG")


def make_tiny_imagenet(
    root: str, classes: int = 3, per_class: int = 4, val_per_class: int = 2, seed: int = 0
) -> list[str]:
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    wnids = [f"n{1000 + i:08d}" for i in range(classes)]
    for w in wnids:
        d = os.path.join(base, "train", w, "images")
        os.makedirs(d)
        for j in range(per_class):
            _jpeg(os.path.join(d, f"{w}_{j}.JPEG"), 64, rng)
    os.makedirs(os.path.join(base, "val", "images"))
    lines = []
    for i in range(classes * val_per_class):
        name = f"val_{i}.JPEG"
        _jpeg(os.path.join(base, "val", "images", name), 64, rng)
        lines.append(f"{name}\t{wnids[i % classes]}\t0\t0\t63\t63\n")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids))
    return wnids


def make_imagenet(root: str, classes: int = 2, per_class: int = 3, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(classes):
            d = os.path.join(root, split, f"n{2000 + i:08d}")
            os.makedirs(d)
            for j in range(per_class):
                _jpeg(os.path.join(d, f"img_{j}.JPEG"), 40, rng)
