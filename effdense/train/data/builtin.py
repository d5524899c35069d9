"""The small datasets that need no download: scikit-learn's digits, Debian's Fashion-MNIST and a synthetic set."""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

from .base import DataError, Split

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_TEST_SIZE = 360
#: the extra of setup.py's ``extras_require`` that installs scikit-learn
SKLEARN_EXTRA = "digits"


def load_digits():
    """scikit-learn's 8x8 digits, bilinearly resized to 32x32, 3 channels; a fixed 360-image test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:
        raise DataError(f"--dataset digits needs scikit-learn, which effdense installs as an extra: pip install "
                        f"'effdense[{SKLEARN_EXTRA}]' (or pip install scikit-learn)") from err
    d = sk_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return Split(images[train], labels[train]), Split(images[test], labels[test]), [str(i) for i in range(10)]


_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format, optionally gzipped): magic ``0 0 dtype ndim``, big-endian int32 sizes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
        if zero != 0 or dtype not in _IDX_DTYPES or not 1 <= ndim <= 3:
            raise ValueError(f"bad magic number {raw[:4].hex()}")
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        body = raw[4 + 4 * ndim:]
        if len(body) != int(np.prod(shape)):
            raise ValueError(f"{len(body)} data bytes for shape {shape}")
    except (OSError, EOFError, ValueError, IndexError) as err:
        raise DataError(f"{path} is not a valid idx file (magic 0x00000801 labels / 0x00000803 images, "
                        f"unsigned bytes): {err}") from err
    return np.frombuffer(body, dtype=_IDX_DTYPES[dtype]).reshape(shape)


def _idx_file(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise DataError(f"{stem}[.gz] not found in {folder}. Fashion-MNIST is read from the idx files of Debian's "
                    f"package (apt-get install dataset-fashion-mnist, which puts them in {FASHION_MNIST_DIR}), or "
                    f"pass --data-dir DIR holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                    f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gzipped or not).")


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def load_fashion_mnist(data_dir: str | None = None):
    """Fashion-MNIST from idx files, 28x28 zero-padded to 32x32, one channel."""
    folder = data_dir or FASHION_MNIST_DIR
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{prefix} files in {folder}: images {images.shape} do not match labels {labels.shape}")
        x = F.pad(torch.from_numpy(images.copy()).unsqueeze(1), (2, 2, 2, 2))
        splits.append(Split(x, torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1], list(FASHION_CLASSES)


def synthetic(n_train: int = 256, n_test: int = 128, num_classes: int = 10, seed: int = 0):
    """Random smooth class prototypes plus noise: learnable, fixed by ``seed``, instant."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear",
                           align_corners=False)

    def make(n: int) -> Split:
        labels = torch.randint(num_classes, (n,), generator=g)
        x = 0.6 * protos[labels] + 0.4 * torch.rand(n, 3, 32, 32, generator=g)
        return Split((x * 255).round().to(torch.uint8), labels)

    return make(n_train), make(n_test), [f"class{i}" for i in range(num_classes)]
