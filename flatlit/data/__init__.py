"""DataModules: MNIST, Fashion-MNIST, CIFAR-10/100 (in memory), TinyImageNet and ImageNet (folders)."""

from flatlit.data.base import FlatlitDataModule, FolderDataModule, InMemoryDataModule
from flatlit.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from flatlit.data.folders import ImageNetDataModule, TinyImageNetDataModule
from flatlit.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "FlatlitDataModule",
    "FolderDataModule",
    "ImageNetDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "TinyImageNetDataModule",
]
