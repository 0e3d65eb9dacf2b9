"""DataModules: MNIST, Fashion-MNIST, CIFAR-10/100 (in memory), TinyImageNet and ImageNet (folders), parallel text
and a synthetic translation task (sequence-to-sequence)."""

from flatlit.data.base import FlatlitDataModule, FolderDataModule, InMemoryDataModule
from flatlit.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from flatlit.data.folders import ImageNetDataModule, TinyImageNetDataModule
from flatlit.data.mnist import FashionMNISTDataModule, MNISTDataModule
from flatlit.data.text import ParallelTextDataModule, SyntheticTranslationDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "FlatlitDataModule",
    "FolderDataModule",
    "ImageNetDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "ParallelTextDataModule",
    "SyntheticTranslationDataModule",
    "TinyImageNetDataModule",
]
