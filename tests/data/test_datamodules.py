import logging
import os

import pytest
import torch

from flatlit.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    TinyImageNetDataModule,
)
from flatlit.data.loader import InMemoryLoader
from flatlit.data.mnist import read_idx
from flatlit.data.transforms import BatchTransform
from flatlit.utils.errors import ConfigError, DataNotFoundError
from tests.fakedata import make_imagenet, make_mnist, make_tiny_imagenet


def test_read_idx_roundtrip(tmp_path):
    images, _labels = make_mnist(str(tmp_path), n_train=30, n_test=10, gz=False)
    assert torch.equal(read_idx(str(tmp_path / "train-images-idx3-ubyte")), torch.from_numpy(images[:30]))
    make_mnist(str(tmp_path / "gz"), n_train=30, n_test=10, gz=True)
    assert read_idx(str(tmp_path / "gz" / "t10k-labels-idx1-ubyte.gz")).shape == (10,)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(DataNotFoundError, match="bad magic"):
        read_idx(str(bad))


def test_mnist_split_subset_and_batches(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=32, val_size=40, split_seed=1, train_subset=100, download=False)
    dm.setup("fit")
    assert len(dm.train_indices) == 100 and len(dm.val_indices) == 40
    assert set(dm.train_indices.tolist()).isdisjoint(dm.val_indices.tolist())
    loader = dm.train_dataloader()
    assert len(loader) == 4
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 40
    # another module with the same seeds sees the same split
    dm2 = MNISTDataModule(data_dir=mnist_dir, val_size=40, split_seed=1, train_subset=100, download=False)
    dm2.setup("fit")
    assert torch.equal(dm.train_indices, dm2.train_indices)


def test_torchvision_layout_and_val_falls_back_to_test(tmp_path):
    make_mnist(str(tmp_path / "MNIST" / "raw"), n_train=50, n_test=20, gz=False)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=16, download=False)
    dm.setup("fit")
    assert sum(len(y) for _, y in dm.val_dataloader()) == 20  # val_size=0: the test split validates
    dm.setup("test")
    assert sum(len(y) for _, y in dm.test_dataloader()) == 20


def test_shuffle_is_seeded_per_epoch(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=240, download=False, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    ((_x0, y0),) = list(loader)
    ((_x0b, y0b),) = list(loader)
    assert torch.equal(y0, y0b)
    loader.sampler.set_epoch(1)
    ((_x1, y1),) = list(loader)
    assert not torch.equal(y0, y1) and torch.equal(y0.sort().values, y1.sort().values)


def test_label_noise_reproducible_saved_and_only_on_train(mnist_dir):
    kw = dict(data_dir=mnist_dir, val_size=40, label_noise=0.5, label_seed=7, download=False)
    dm = MNISTDataModule(**kw)
    dm.setup("fit")
    changed = (dm.train_targets != dm.clean_train_targets).float().mean().item()
    assert 0.25 < changed < 0.65
    dm2 = MNISTDataModule(**kw)
    dm2.setup("fit")
    assert torch.equal(dm.train_targets, dm2.train_targets)
    # the checkpointed label vector wins over a fresh draw (resume with a different seed keeps the labels)
    state = dm.state_dict()
    dm3 = MNISTDataModule(**{**kw, "label_seed": 99})
    dm3.load_state_dict(state)
    dm3.setup("fit")
    assert torch.equal(dm3.train_targets, dm.train_targets)
    # validation labels stay clean
    all_labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(all_labels, dm._all_targets[dm.val_indices])
    assert MNISTDataModule(data_dir=mnist_dir, random_labels=True).label_noise == 1.0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"label_noise": 1.5}, "label_noise"),
        ({"label_noise": -0.2}, "label_noise"),
        ({"augment": "bogus"}, "augment"),
        ({"normalize": "bogus"}, "normalize"),
        ({"input_noise": -1.0}, "input_noise"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"data.init_args.{key}"):
        MNISTDataModule(**kwargs)


def test_subset_larger_than_dataset(mnist_dir):
    dm = MNISTDataModule(data_dir=mnist_dir, val_size=40, train_subset=1000, download=False)
    with pytest.raises(ConfigError, match="train_subset: asked for 1000 examples but the training split holds 200"):
        dm.setup("fit")


def test_input_noise_fixed_and_fresh(mnist_dir):
    fixed = MNISTDataModule(
        data_dir=mnist_dir, input_noise=0.5, noise_seed=1, normalize="none", download=False, batch_size=240
    )
    fixed.setup("fit")
    clean = fixed._all_images[fixed.train_indices].float() / 255
    delta = fixed._train_images - clean
    assert abs(delta.std().item() - 0.5) < 0.01 and abs(delta.mean().item()) < 0.01
    first = torch.cat([x for x, _ in fixed.train_dataloader()])
    second = torch.cat([x for x, _ in fixed.train_dataloader()])
    assert torch.equal(first, second)  # same noise every epoch
    fresh = MNISTDataModule(
        data_dir=mnist_dir, input_noise=0.5, input_noise_mode="fresh", normalize="none", download=False, batch_size=240
    )
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    a = next(iter(loader))[0]
    loader.sampler.set_epoch(1)
    b = next(iter(loader))[0]
    assert abs((a - a.clamp(0, 1)).abs().sum().item()) > 0 and not torch.equal(a, b)
    val = torch.cat([x for x, _ in fresh.val_dataloader()])
    assert val.min() >= 0 and val.max() <= 1  # evaluation data is clean


def test_fashion_mnist_offline_fallback(tmp_path, monkeypatch, caplog):
    debian = tmp_path / "debian"
    make_mnist(str(debian), n_train=30, n_test=10, gz=True)
    monkeypatch.setattr(FashionMNISTDataModule, "fallback_dirs", (str(debian),))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    dm.setup("fit")
    assert len(dm.train_indices) == 30


def test_fashion_mnist_debian_copy_is_used_without_a_download_attempt(tmp_path, monkeypatch, recwarn, caplog):
    """With download on (the default), a Debian copy holding the files is read as it is: no network, no warning."""
    import torchvision

    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nTried 4 mirrors\n...")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    debian = tmp_path / "debian"
    make_mnist(str(debian), n_train=30, n_test=10, gz=True)  # the real IDX .gz format, as Debian ships it
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    assert sorted(os.listdir(debian)) == sorted(f"{n}.gz" for n in names)
    monkeypatch.setattr(FashionMNISTDataModule, "fallback_dirs", (str(debian),))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"))
    assert dm.download
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_indices) == 30
    assert attempts == [] and not os.path.exists(tmp_path / "empty")
    assert [str(w.message) for w in recwarn] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_fashion_mnist_downloads_only_when_no_copy_has_the_files(tmp_path, monkeypatch):
    import torchvision

    attempts = []

    def offline(root, train, download):
        attempts.append((root, train, download))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz\nTried 4 mirrors")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setattr(FashionMNISTDataModule, "fallback_dirs", (str(tmp_path / "no_debian"),))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"))
    with pytest.warns(UserWarning) as record:
        dm.prepare_data()
    assert attempts == [(str(tmp_path / "empty"), True, True)]
    (w,) = [w for w in record if "could not download" in str(w.message)]
    assert str(w.message).count("\n") == 0 and "FashionMNIST" in str(w.message)
    with pytest.raises(DataNotFoundError, match="not found"):
        dm.setup("fit")


def test_missing_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNISTDataModule, "fallback_dirs", (str(tmp_path / "nope"),))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")
    with pytest.raises(DataNotFoundError, match="data_batch_1 not found"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).setup("fit")
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200"):
        TinyImageNetDataModule(data_dir=str(tmp_path), download=False).setup("fit")
    with pytest.raises(DataNotFoundError, match="cannot be downloaded automatically"):
        ImageNetDataModule(data_dir=str(tmp_path)).setup("fit")


@pytest.mark.parametrize("cls, classes", [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
@pytest.mark.parametrize("augment", ["none", "basic", "cutout", "autoaugment"])
def test_cifar(cifar_dir, cls, classes, augment):
    dm = cls(data_dir=cifar_dir, batch_size=50, val_size=0.1, augment=augment, download=False)
    dm.setup("fit")
    assert dm.num_classes == classes and dm.input_shape == (3, 32, 32)
    assert len(dm.train_indices) == 180 and len(dm.val_indices) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 3, 32, 32) and y.max() < classes
    assert torch.isfinite(x).all()


def test_tiny_imagenet_layout(tmp_path):
    wnids = make_tiny_imagenet(str(tmp_path))
    dm = TinyImageNetDataModule(data_dir=str(tmp_path), batch_size=5, augment="basic", download=False)
    dm.setup("fit")
    assert len(dm.train_indices) == 12
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 64, 64)
    val = dm._test_base
    assert len(val.targets) == 6 and val.targets[:3] == [0, 1, 2] and val.classes == wnids
    xs, ys = next(iter(dm.val_dataloader()))
    assert xs.shape[1:] == (3, 64, 64) and ys.tolist() == [0, 1, 2, 0, 1]


def test_imagenet_folders_and_noise(tmp_path):
    make_imagenet(str(tmp_path))
    dm = ImageNetDataModule(data_dir=str(tmp_path), batch_size=3, input_noise=0.1, val_size=2)
    dm.setup("fit")
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 224, 224)
    x2, _ = next(iter(dm.val_dataloader()))
    assert x2.shape == (2, 3, 224, 224)
    ds = dm.train_dataloader().dataset
    assert torch.equal(ds[0][0], ds[0][0])  # fixed noise: the same example gets the same noise


def test_loader_ddp_shards_cover_the_data():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    targets = torch.arange(10)
    seen = []
    for rank in range(2):
        loader = InMemoryLoader(images, targets, 2, BatchTransform(), shuffle=True, seed=0, rank=rank, world_size=2)
        loader.sampler.set_epoch(3)
        seen.append(torch.cat([y for _, y in loader]))
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(torch.cat(seen).tolist()) == list(range(10))


def test_save_labels_file(mnist_dir, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    dm = MNISTDataModule(data_dir=mnist_dir, label_noise=0.2, download=False)
    trainer = pl.Trainer(logger=TensorBoardLogger(str(tmp_path), name="r"), max_epochs=1)
    dm.trainer = trainer
    dm.setup("fit")
    saved = torch.load(os.path.join(trainer.log_dir, "train_labels.pt"))
    assert torch.equal(saved["targets"], dm.train_targets) and saved["label_noise"] == 0.2


def test_no_labels_file_without_a_logger(mnist_dir, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    monkeypatch.chdir(tmp_path)  # without a logger, trainer.log_dir is the working directory: nothing goes there
    dm = MNISTDataModule(data_dir=mnist_dir, label_noise=0.2, download=False)
    dm.trainer = pl.Trainer(logger=False, max_epochs=1)
    dm.setup("fit")
    assert not os.path.exists(tmp_path / "train_labels.pt")


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path, cifar_dir):
    """The CIFAR batch files are pickles: reading one only builds dicts, lists, bytes and NumPy arrays."""
    import pickle

    from flatlit.data.cifar import read_cifar_batch

    good = os.path.join(cifar_dir, "cifar-10-batches-py", "data_batch_1")
    assert read_cifar_batch(good)[b"data"].shape[1] == 3 * 32 * 32
    marker = tmp_path / "pwned"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Trap(), b"labels": [0]}))
    with pytest.raises(DataNotFoundError, match="not a CIFAR batch"):
        read_cifar_batch(str(bad))
    assert not marker.exists()
