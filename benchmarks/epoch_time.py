"""Epoch time of flatlit's SGD training vs a hand-written loop and vs the torchvision/PIL pipeline.

All three train the same model (same init) with SGD(momentum 0.9) on the same real Fashion-MNIST training split
(Debian's copy or ``--data-dir``), batch 128, one epoch each, interleaved over ``--repeats`` rounds; the
minimum per pipeline is kept (the least disturbed measurement on a shared machine).

- ``raw``: a PyTorch loop over pre-normalised in-memory tensors (``x[idx]`` slicing, no DataLoader).
- ``flatlit``: ``Trainer.fit`` with ``SGDFamily`` and ``FashionMNISTDataModule`` (in-memory fast path), timed
  from ``on_train_epoch_start`` to ``on_train_epoch_end`` (validation off, no logger/checkpoint).
- ``pil``: ``torchvision.datasets.FashionMNIST`` + ``ToTensor``/``Normalize`` in a shuffled ``DataLoader``
  with ``--workers`` processes, the pipeline the reference repositories use.

Prints ``{"vs_raw_loop": flatlit/raw, "vs_pil_pipeline": flatlit/pil, ...}`` with ``--json``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import EpochTimer, bench_trainer, emit, timed

from flatlit.data import FashionMNISTDataModule
from flatlit.data.mnist import DEBIAN_FASHION_MNIST
from flatlit.methods import SGDFamily
from flatlit.models import create_model


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def raw_epoch(args, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = create_model(args.model, 10, 1, 28)
    opt = make_optimizer(model.parameters())
    model.train()

    def run() -> None:
        perm = torch.randperm(len(x))
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(run)


def flatlit_epoch(args) -> float:
    torch.manual_seed(0)
    module = SGDFamily(arch=args.model, num_classes=10, in_channels=1, image_size=28, optimizer=make_optimizer)
    dm = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size, download=False)
    timer = EpochTimer()
    trainer = bench_trainer(max_epochs=1, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.times[0]


def pil_epoch(args, root: str) -> float:
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(0)
    model = create_model(args.model, 10, 1, 28)
    opt = make_optimizer(model.parameters())
    ds = torchvision.datasets.FashionMNIST(
        root,
        train=True,
        download=False,
        transform=T.Compose([T.ToTensor(), T.Normalize((0.2860,), (0.3530,))]),
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, persistent_workers=False
    )

    def run() -> None:
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(run)


def torchvision_root(src: str) -> str:
    """A temporary torchvision-layout copy (raw/ with uncompressed idx files) of the Fashion-MNIST files."""
    root = tempfile.mkdtemp(prefix="flatlit-bench-")
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        gz = os.path.join(src, name + ".gz")
        if os.path.isfile(gz):
            with gzip.open(gz, "rb") as f, open(os.path.join(raw, name), "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            shutil.copy(os.path.join(src, name), os.path.join(raw, name))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = FashionMNISTDataModule(data_dir=args.data_dir, download=False)
    dm.setup("fit")
    mean, std = 0.2860, 0.3530
    x = (dm._train_images.float() / 255.0 - mean) / std
    y = dm.train_targets.clone()
    root = torchvision_root(args.data_dir)
    times: dict[str, list[float]] = {"raw": [], "flatlit": [], "pil": []}
    try:
        for _ in range(args.repeats):
            times["raw"].append(raw_epoch(args, x, y))
            times["flatlit"].append(flatlit_epoch(args))
            times["pil"].append(pil_epoch(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    emit(
        {
            "vs_raw_loop": best["flatlit"] / best["raw"],
            "vs_pil_pipeline": best["flatlit"] / best["pil"],
            "flatlit_epoch_s": best["flatlit"],
            "raw_epoch_s": best["raw"],
            "pil_epoch_s": best["pil"],
            "model": args.model,
            "examples": len(x),
            "batch_size": args.batch_size,
            "pil_workers": args.workers,
            "torch_threads": torch.get_num_threads(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
