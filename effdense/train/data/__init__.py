"""Datasets for the training command, held whole as ``uint8`` tensors, and batched augmentation on the device.

A dataset is small enough to live on the device (CIFAR's 50,000 training images are 150 MB as ``uint8``), so
a training step gathers its batch by index there and augments it there (:mod:`.augment`), as one batched operation:
data loading never waits on CPU workers.

Datasets (:data:`DATASETS`):

* ``cifar10`` / ``cifar100`` (:mod:`.cifar`): downloaded with the published md5 checked, or read from a folder.
* ``digits`` (:mod:`.builtin`): scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), resized
  to 32x32 and repeated to 3 channels; a fixed 360-image test split.
* ``fashion-mnist`` (:mod:`.builtin`): the idx files of Debian's ``dataset-fashion-mnist`` package (default folder
  ``/usr/share/datasets/fashion-mnist``), 28x28 grey images zero-padded to 32x32.
* ``synthetic`` (:mod:`.builtin`): a small generated 10-class set with a learnable signal, for smoke tests.
* ``folder`` (:mod:`.folder`): a user's images in the ImageFolder layout, the exception: too large to hold, they
  stream from disk through a ``DataLoader`` and torchvision's transforms (the ``effdense[vision]`` extra).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .augment import Augment
from .base import CACHE_ENV, DataError, Dataset, Split, default_cache
from .builtin import load_digits, load_fashion_mnist, synthetic
from .cifar import CIFAR, load_cifar
from .folder import FolderData, ImageFiles, folder_options, load_folder

DATASETS = ("cifar10", "cifar100", "digits", "fashion-mnist", "synthetic", "folder")


def split_validation(train: Split, val_size: int, seed: int = 0) -> tuple[Split, Split | None]:
    """Hold out ``val_size`` random training images (a fixed draw for a given ``seed``)."""
    if val_size <= 0:
        return train, None
    if val_size >= len(train):
        raise ValueError(f"--val-size {val_size} leaves no training images (the training set has {len(train)}); "
                         f"use a value in [0, {len(train) - 1}]")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train[perm[val_size:]], train[perm[:val_size]]


def image_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``uint8`` images, in [0, 1] units."""
    x = images.double().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def load_dataset(name: str, data_dir: str | None = None, val_size: int = 0, allow_download: bool = True,
                 split_seed: int = 0, folder: dict | None = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) on the CPU, with ``val_size`` training images held out;
    ``folder``: the keyword arguments of :func:`.folder.load_folder` (see :func:`.folder.folder_options`)."""
    if name == "folder":
        return load_folder(data_dir, val_size, split_seed, **(folder or {}))
    if name in CIFAR:
        train, test, classes = load_cifar(name, data_dir, allow_download)
    elif name == "digits":
        train, test, classes = load_digits()
    elif name == "fashion-mnist":
        train, test, classes = load_fashion_mnist(data_dir)
    elif name == "synthetic":
        train, test, classes = synthetic()
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    train, val = split_validation(train, val_size, split_seed)
    mean, std = image_stats(train.images)
    return Dataset(name, train, val, test, classes, mean, std, flip=name != "digits")


__all__ = ["Augment", "CACHE_ENV", "CIFAR", "DATASETS", "DataError", "Dataset", "FolderData", "ImageFiles", "Split",
           "default_cache", "folder_options", "load_folder",
           "image_stats", "load_dataset", "split_validation"]
