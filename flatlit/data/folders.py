"""TinyImageNet and ImageNet DataModules (JPEG folders, torchvision transforms).

TinyImageNet uses the official ``tiny-imagenet-200`` layout: ``train/<wnid>/images/*.JPEG``,
``val/images/*.JPEG`` with ``val/val_annotations.txt`` (file, wnid, box). Its unlabelled ``test/`` split is not
used: the official validation split is the test split. ImageNet expects ``train/<wnid>/*.JPEG`` and
``val/<wnid>/*.JPEG`` (ILSVRC-2012 arranged in class folders; torchvision's ``ImageNet`` prepares this layout).
"""

from __future__ import annotations

import os

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from flatlit.data.base import FolderDataModule
from flatlit.utils.errors import DataNotFoundError

IMAGE_EXTS = (".jpeg", ".jpg", ".png")


class ImageList:
    """A list of (path, label) pairs; ``load(i)`` opens image ``i`` as RGB."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples, self.classes = samples, classes
        self.targets = [label for _, label in samples]

    def load(self, i: int) -> Image.Image:
        with Image.open(self.samples[i][0]) as img:
            return img.convert("RGB")


def _images_in(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))


class TinyImageNetDataModule(FolderDataModule):
    """TinyImageNet-200 (64×64, 200 classes; 100k train, 10k labelled val)."""

    dataset_name = "tiny_imagenet"
    num_classes = 200
    image_size = 64
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

    @property
    def root(self) -> str:
        return os.path.join(self.data_dir, "tiny-imagenet-200")

    def prepare_data(self) -> None:
        if os.path.isdir(os.path.join(self.root, "train")) or not self.download:
            return
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(self.url, self.data_dir)
        except Exception as err:
            rank_zero_warn(f"flatlit: could not download TinyImageNet ({type(err).__name__}: {err}).")

    def _dataset(self, split: str) -> ImageList:
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):
            raise DataNotFoundError(
                f"TinyImageNet not found: {train_dir} does not exist. Set data.init_args.data_dir to the folder "
                f"that contains tiny-imagenet-200/, or download {self.url} and unzip it there."
            )
        classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
        index = {wnid: i for i, wnid in enumerate(classes)}
        samples: list[tuple[str, int]] = []
        if split == "train":
            for wnid in classes:
                img_dir = os.path.join(train_dir, wnid, "images")
                samples += [(os.path.join(img_dir, f), index[wnid]) for f in _images_in(img_dir)]
        else:
            ann = os.path.join(self.root, "val", "val_annotations.txt")
            if not os.path.isfile(ann):
                raise DataNotFoundError(f"TinyImageNet: {ann} not found; the val split needs its annotation file.")
            with open(ann) as f:
                for line in f:
                    parts = line.strip().split("\t")
                    if len(parts) < 2:
                        continue
                    if parts[1] not in index:
                        raise DataNotFoundError(f"{ann}: class {parts[1]!r} has no folder under {train_dir}.")
                    samples.append((os.path.join(self.root, "val", "images", parts[0]), index[parts[1]]))
        if not samples:
            raise DataNotFoundError(f"TinyImageNet: no images found for split {split!r} under {self.root}.")
        return ImageList(samples, classes)


class ImageNetDataModule(FolderDataModule):
    """ImageNet ILSVRC-2012 (1000 classes), Resize 256 + CenterCrop 224 for evaluation (SPEC §5.9)."""

    dataset_name = "imagenet"
    num_classes = 1000
    image_size = 224
    resize = 256

    def _dataset(self, split: str) -> ImageList:
        folder = os.path.join(self.data_dir, split)
        if not os.path.isdir(folder):
            raise DataNotFoundError(
                f"ImageNet not found: {folder} does not exist. ImageNet cannot be downloaded automatically "
                f"(license); get ILSVRC-2012 from https://image-net.org, arrange train/ and val/ in class folders "
                f"(torchvision.datasets.ImageNet does this) and set data.init_args.data_dir to their parent."
            )
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        samples = [
            (os.path.join(folder, c, f), i) for i, c in enumerate(classes) for f in _images_in(os.path.join(folder, c))
        ]
        if not samples:
            raise DataNotFoundError(f"ImageNet: no images under {folder}/<class>/.")
        return ImageList(samples, classes)
