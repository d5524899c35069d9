"""CIFAR-10/100: the python-pickle batches of https://www.cs.toronto.edu/~kriz/cifar.html, read from ``data_dir`` (the
extracted ``cifar-10-batches-py``/``cifar-100-python`` folder, the folder above it, or the tarball), else
downloaded into it (default: :func:`~.base.default_cache`) with the published md5 checked; every failure says how
to supply the files."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoints import atomic_write
from .base import DataError, Split, default_cache

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
