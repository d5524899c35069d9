"""Datasets for the training command, held whole as ``uint8`` tensors, and batched augmentation on the device.

A dataset is small enough to live on the device (CIFAR's 50,000 training images are 150 MB as ``uint8``), so
a training step gathers its batch by index there and augments it there, as one batched operation: data
loading never waits on CPU workers.

Datasets (:data:`DATASETS`):

* ``cifar10`` / ``cifar100``: the python-pickle batches of https://www.cs.toronto.edu/~kriz/cifar.html,
  read from ``data_dir`` (the extracted ``cifar-10-batches-py``/``cifar-100-python`` folder, the folder above
  it, or the tarball), else downloaded into it (default: :func:`default_cache`) with the published md5 checked.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), resized to 32x32
  and repeated to 3 channels; a fixed 360-image test split.
* ``fashion-mnist``: the idx files of Debian's ``dataset-fashion-mnist`` package (default folder
  ``/usr/share/datasets/fashion-mnist``), 28x28 grey images zero-padded to 32x32.
* ``synthetic``: a small generated 10-class set with a learnable signal, for smoke tests.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint_io import atomic_write

CACHE_ENV = "EFFDENSE_DATA"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DataError(RuntimeError):
    """A dataset is missing, corrupt or cannot be downloaded; the message says how to supply it."""


def default_cache() -> str:
    """``$EFFDENSE_DATA``, else ``$XDG_CACHE_HOME/effdense/datasets`` (``~/.cache/effdense/datasets``)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "effdense", "datasets")


# ---------------------------------------------------------------------------------------------- containers

@dataclass
class Split:
    """Images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``."""

    images: Tensor
    labels: Tensor

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, train=self.train.to(device), test=self.test.to(device),
                       val=None if self.val is None else self.val.to(device))


# ---------------------------------------------------------------------------------------------- CIFAR

@dataclass(frozen=True)
class CifarSpec:
    title: str
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    classes_key: str
    #: published md5 of each extracted file (quoted in errors about a corrupt file)
    file_md5: dict

    @property
    def tarball(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


_KRIZ = "https://www.cs.toronto.edu/~kriz/"
CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "CIFAR-10", _KRIZ + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", "labels", "label_names",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
         "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": CifarSpec(
        "CIFAR-100", _KRIZ + "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
         "meta": "7973b15100ade9c7d40fb424638fde48"}),
}


def md5sum(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _how_to_supply(spec: CifarSpec, data_dir: str) -> str:
    return (f"Supply it in one of these ways: (1) on a machine with internet access download {spec.url} "
            f"(md5 {spec.md5}) and copy {spec.tarball} into {data_dir}; (2) extract that tarball and pass "
            f"--data-dir DIR where DIR holds {spec.folder}/ (or its files directly: {', '.join(spec.files)}).")


def _corrupt_advice(spec: CifarSpec, path: str) -> str:
    """How to replace a bad extracted file: the extracted files are read before any tarball beside them, so a
    good tarball helps only once they are gone."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == spec.folder:
        parent, remove = os.path.dirname(folder), f"delete the folder {folder}"
    else:
        parent, remove = folder, f"delete the extracted files in {folder} ({', '.join(spec.files)})"
    return (f"Extracted files are read before any tarball, so {remove}, then supply {spec.title} again. "
            + _how_to_supply(spec, parent))


def download(url: str, dest: str, md5: str) -> None:
    """Fetch ``url`` to ``dest`` atomically; the file appears only once its md5 is ``md5``."""
    def write(f) -> None:
        h = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
        got = h.hexdigest()
        if got != md5:
            raise DataError(f"download of {url} has md5 {got}, expected {md5}; nothing was kept")
    atomic_write(dest, write)


def _check_tarball(spec: CifarSpec, path: str) -> None:
    got = md5sum(path)
    if got != spec.md5:
        raise DataError(f"{path} is corrupt: its md5 is {got}, the published md5 of {spec.tarball} is {spec.md5}. "
                        f"Delete it and download it again. " + _how_to_supply(spec, os.path.dirname(path)))


def _extract(spec: CifarSpec, tarball: str, root: str) -> str:
    """Extract ``tarball`` into ``root/spec.folder`` via a temporary folder, so a failure leaves nothing."""
    _check_tarball(spec, tarball)
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        os.replace(os.path.join(tmp, spec.folder), os.path.join(root, spec.folder))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(root, spec.folder)


def find_cifar(spec: CifarSpec, data_dir: str, allow_download: bool = True) -> str:
    """The folder holding ``spec``'s extracted files: found in ``data_dir``, extracted from the tarball there,
    or downloaded into it."""
    for folder in (os.path.join(data_dir, spec.folder), data_dir):
        present = [f for f in spec.files if os.path.isfile(os.path.join(folder, f))]
        if len(present) == len(spec.files):
            return folder
        if present:
            missing = sorted(set(spec.files) - set(present))
            raise DataError(f"{spec.title} in {folder} is incomplete: missing {', '.join(missing)}. "
                            + _how_to_supply(spec, data_dir))
    tarball = os.path.join(data_dir, spec.tarball)
    if not os.path.isfile(tarball):
        if not allow_download:
            raise DataError(f"{spec.title} not found in {data_dir}. " + _how_to_supply(spec, data_dir))
        os.makedirs(data_dir, exist_ok=True)
        print(f"downloading {spec.url} to {data_dir}", flush=True)
        try:
            download(spec.url, tarball, spec.md5)
        except (urllib.error.URLError, OSError) as err:
            raise DataError(f"{spec.title} not found in {data_dir} and downloading {spec.url} failed "
                            f"({err}). " + _how_to_supply(spec, data_dir)) from err
    return _extract(spec, tarball, data_dir)


def _unpickle(path: str, spec: CifarSpec) -> dict:
    """A CIFAR python-pickle file as a dict with ``str`` keys (the files were written by Python 2)."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="latin1")
        if not isinstance(raw, dict):
            raise TypeError(f"a {type(raw).__name__}, not a dict")
    except Exception as err:
        raise DataError(f"{path} is corrupt or not a CIFAR python-pickle file ({type(err).__name__}: {err}); its "
                        f"md5 is {md5sum(path)}, the published {name} has md5 {spec.file_md5.get(name, '?')}. "
                        + _corrupt_advice(spec, path)) from err
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_cifar_batch(path: str, spec: CifarSpec) -> Split:
    """One batch file: ``data`` ``uint8 [N, 3072]`` (RGB planes, row-major) and ``N`` labels."""
    d = _unpickle(path, spec)
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d[spec.label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
            raise ValueError(f"data {data.dtype}{list(data.shape)} with {labels.shape[0]} labels")
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"{path} is not in the CIFAR batch format (a dict with 'data': uint8 [N, 3072] and "
                        f"'{spec.label_key}': N ints): {type(err).__name__}: {err}. "
                        + _corrupt_advice(spec, path)) from err
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels))


def _cat(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def load_cifar(name: str, data_dir: str | None = None, allow_download: bool = True):
    """``(train, test, classes)`` of ``cifar10`` or ``cifar100``."""
    spec = CIFAR[name]
    if data_dir is not None and not os.path.isdir(data_dir):  # a typo: neither create it nor download into it
        raise DataError(f"data folder {data_dir} not found (--data-dir must be an existing folder; create it to "
                        f"download {spec.title} into it, or leave --data-dir out for {default_cache()})")
    folder = find_cifar(spec, data_dir or default_cache(), allow_download)
    train = _cat([read_cifar_batch(os.path.join(folder, f), spec) for f in spec.train_files])
    test = _cat([read_cifar_batch(os.path.join(folder, f), spec) for f in spec.test_files])
    meta_path = os.path.join(folder, spec.meta_file)
    meta = _unpickle(meta_path, spec)
    if spec.classes_key not in meta:
        raise DataError(f"{meta_path} has no '{spec.classes_key}' list of class names")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec.classes_key]]
    for split, what in ((train, "training"), (test, "test")):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(classes)):
            raise DataError(f"{spec.title} {what} labels in {folder} are outside [0, {len(classes)})")
    return train, test, classes


# ---------------------------------------------------------------------------------------------- others

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


# ---------------------------------------------------------------------------------------------- assembly

DATASETS = ("cifar10", "cifar100", "digits", "fashion-mnist", "synthetic")


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
                 split_seed: int = 0) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) on the CPU, with ``val_size`` training images held out."""
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


# ---------------------------------------------------------------------------------------------- augmentation

class Augment:
    """The paper's augmentation, batched on the images' device: zero-pad ``pad`` pixels, take a random crop of
    the original size, flip horizontally with probability 1/2; then per-channel normalization.

    Random parameters come from a CPU :class:`torch.Generator` (:meth:`draw`), so a run augments identically
    on every device and every rank can draw the parameters of the whole global batch and apply its slice.
    """

    def __init__(self, mean, std, pad: int = 4, flip: bool = True) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad, self.flip = pad, flip

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """``[n, 3]`` int64: row offset, column offset (in ``[0, 2*pad]``), flip (0 or 1)."""
        params = torch.randint(0, 2 * self.pad + 1, (n, 3), generator=generator)
        params[:, 2] = torch.randint(0, 2, (n,), generator=generator) if self.flip else 0
        return params

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8`` images to normalized float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255) - mean).div_(std)

    def __call__(self, images: Tensor, params: Tensor | None = None) -> Tensor:
        """Augment ``uint8 [n, C, H, W]`` images with ``params`` from :meth:`draw` (None: only normalize)."""
        if params is None:
            return self.normalize(images)
        n, c, h, w = images.shape
        params = params.to(images.device)
        padded = F.pad(images, (self.pad,) * 4)
        rows = (params[:, 0:1] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
        cols = (params[:, 1:2] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
        flip = params[:, 2].view(n, 1, 1, 1).bool()
        cols = torch.where(flip, cols.flip(3), cols)
        idx = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        chan = torch.arange(c, device=images.device).view(1, c, 1, 1)
        return self.normalize(padded[idx, chan, rows, cols])
