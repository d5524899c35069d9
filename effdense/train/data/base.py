"""What every dataset of the training command is: images held whole as ``uint8`` tensors, with their labels, split
into train, validation and test, and the error a missing or corrupt dataset raises."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

CACHE_ENV = "EFFDENSE_DATA"



class DataError(RuntimeError):
    """A dataset is missing, corrupt or cannot be downloaded; the message says how to supply it."""


def default_cache() -> str:
    """``$EFFDENSE_DATA``, else ``$XDG_CACHE_HOME/effdense/datasets`` (``~/.cache/effdense/datasets``)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "effdense", "datasets")


@dataclass
class Split:
    """Images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``."""

    images: Tensor
    labels: Tensor
    #: held whole (False) or streamed from disk (:class:`.folder.ImageFiles`)
    streaming: ClassVar[bool] = False

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: Tensor | slice) -> Split:
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    #: per-channel mean and standard deviation of the training images, in [0, 1] units
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: whether horizontal flips are a valid augmentation (not for digits)
    flip: bool = True
    #: held whole on the device (False) or streamed batch by batch (:class:`.folder.FolderData`)
    streaming: ClassVar[bool] = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, train=self.train.to(device), test=self.test.to(device),
                       val=None if self.val is None else self.val.to(device))
