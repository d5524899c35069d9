"""``--dataset folder``: a user's images in the ImageFolder layout, streamed from disk (the ``effdense[vision]`` extra).

``ROOT/train/<class>/...`` holds the training images (any depth below the class folder, as torchvision's
``ImageFolder``; files whose extension is not an image's are ignored). The test split is ``ROOT/test/`` if there is
one, else ``ROOT/val/`` (as torchvision's and timm's ImageNet recipes report on val), else the held-out images.
The validation split (best.pt is chosen on it) is ``--val-size N`` training images held out, stratified by class;
without it, ``ROOT/val/`` when ``ROOT/test/`` exists too, else none (best.pt is chosen on the test split).

Unlike the in-memory datasets, images are decoded and augmented by ``DataLoader`` workers with
``torchvision.transforms.v2`` (training: RandomResizedCrop, horizontal flip; evaluation: resize to
``size / 0.875``, center crop; then normalization). :class:`EpochBatches` orders them: a permutation per epoch
from the seed, the global batch of step ``s`` split between the processes as the in-memory datasets split it,
and an augmentation seed per image and epoch, so a run resumed inside an epoch streams the same batches from that
step on, whatever the number of workers, without reading the steps before it.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..schedule import _generator
from .base import DataError, Dataset

#: the extra of setup.py's ``extras_require`` that installs torchvision and pillow
VISION_EXTRA = "vision"
#: torchvision's ``IMG_EXTENSIONS`` (lower case): other files are ignored
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
#: evaluation resizes the shorter side to ``size / EVAL_CROP`` and takes the center ``size`` x ``size``
EVAL_CROP = 0.875
#: skipped images named on stderr per split; the rest are only counted
NAMED_SKIPS = 10


def require_vision() -> None:
    """torchvision and pillow, or a one-line :class:`DataError` naming the extra that installs them."""
    try:
        import PIL  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as err:
        raise DataError(f"--dataset folder needs torchvision and pillow ({err}): pip install "
                        f"'effdense[{VISION_EXTRA}]'") from None


def default_workers(world: int = 1) -> int:
    """Loader workers per process: the CPUs this process may use, shared by the ``world`` processes, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // world))


# -- the files


def class_folders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: str) -> list[str]:
    """The image files below ``folder`` (any depth, links followed), sorted; hidden and non-image files left out."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(top, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def scan(folder: str, classes: Sequence[str], allow_empty: bool) -> list[tuple[str, int]]:
    """``(path, label)`` of every image of ``folder``'s class folders; a :class:`DataError` when there is none, or
    (unless ``allow_empty``) when a class folder has none."""
    per_class = [image_files(os.path.join(folder, c)) for c in classes]
    empty = [c for c, files in zip(classes, per_class) if not files]
    if len(empty) == len(classes):
        raise DataError(f"{folder} holds no images: its {len(classes)} class folder(s) have no files with an image "
                        f"extension ({', '.join(IMAGE_EXTENSIONS)})")
    if empty and not allow_empty:
        raise DataError(f"{folder}: class folder(s) with no images: {', '.join(empty)} (a class without training "
                        "images cannot be learned; add images or remove the folder)")
    return [(path, label) for label, files in enumerate(per_class) for path in files]


def check_classes(train: str, other: str, classes: list[str]) -> None:
    """The class folders of ``other`` (val/ or test/) are those of ``train``, or a :class:`DataError` naming each."""
    theirs = class_folders(other)
    if theirs != classes:
        only_train, only_other = sorted(set(classes) - set(theirs)), sorted(set(theirs) - set(classes))
        raise DataError(f"the class folders of {train} and {other} differ: only in {os.path.basename(train)}/: "
                        f"{', '.join(only_train) or '-'}; only in {os.path.basename(other)}/: "
                        f"{', '.join(only_other) or '-'}")


def stratified_split(labels: Sequence[int], val_size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, val)`` positions: ``val_size`` images drawn at random (fixed by ``seed``), each class giving its
    share (largest remainders), every class keeping at least one training image."""
    n = len(labels)
    if not 0 < val_size < n:
        raise ValueError(f"--val-size {val_size} must be in [1, {n - 1}] (the training folder has {n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    members: dict[int, list[int]] = {}
    for i in perm:
        members.setdefault(labels[i], []).append(i)
    share = {c: val_size * len(m) / n for c, m in members.items()}
    quota = {c: min(int(s), len(members[c]) - 1) for c, s in share.items()}
    by_remainder = sorted(members, key=lambda c: (quota[c] - share[c], c))
    while sum(quota.values()) < val_size:
        room = [c for c in by_remainder if quota[c] < len(members[c]) - 1]
        if not room:
            raise ValueError(f"--val-size {val_size} leaves a class without training images; use at most "
                             f"{n - len(members)}")
        for c in room[:val_size - sum(quota.values())]:
            quota[c] += 1
    val = sorted(i for c, m in members.items() for i in m[:quota[c]])
    held = set(val)
    return [i for i in range(n) if i not in held], val


# -- decoding and batches


def to_rgb(img):
    """A PIL image as 8-bit RGB: 16- and 32-bit integer grey scaled to 8 bits (``convert`` would clip it), the
    rest (grey, palette, RGBA's alpha dropped, CMYK) by PIL's ``convert``, as torchvision's loader does."""
    from PIL import Image
    if img.mode.startswith("I"):
        import numpy as np
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(a / 257), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str):
    """The image at ``path`` decoded whole, turned as its EXIF orientation says, as RGB; ``OSError`` or
    ``ValueError`` when it cannot be read."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as err:
        raise ValueError(str(err)) from None
    except SyntaxError as err:  # some of PIL's plugins report a malformed header so
        raise ValueError(str(err)) from None


def transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool):
    """torchvision ``transforms.v2``: the training augmentation or the evaluation crop, then normalization."""
    from torchvision.transforms import v2
    if train:
        head = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        head = [v2.Resize(round(image_size / EVAL_CROP), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*head, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class EpochBatches:
    """A batch sampler of ``(index, augmentation seed)``: as the in-memory datasets, step ``s`` of epoch ``e``
    takes the images ``perm[s*B : (s+1)*B]`` of the epoch's permutation (``B`` the global batch) and this process
    the ``[rank*b : (rank+1)*b]`` of them; the last ``n mod B`` images of the permutation wait for another epoch,
    so each image is seen at most once an epoch over all processes. :meth:`set_epoch` chooses the epoch and the
    step to start from. Without ``shuffle`` (evaluation): this process's images ``rank::world`` in order, all of
    them, in batches of ``b``, no seed."""

    def __init__(self, n: int, batch: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        self.n, self.batch, self.world, self.rank, self.seed, self.shuffle = n, batch, world, rank, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        if self.shuffle:
            return max(self.n // (self.batch * self.world) - self.start, 0)
        return -(-len(range(self.rank, self.n, self.world)) // self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        b = self.batch
        if not self.shuffle:
            idx = list(range(self.rank, self.n, self.world))
            yield from ([(i, None) for i in idx[j:j + b]] for j in range(0, len(idx), b))
            return
        perm = torch.randperm(self.n, generator=_generator(self.seed, self.epoch))
        seeds = torch.randint(2**62, (self.n,), generator=_generator(self.seed, self.epoch, -1))
        step_size = b * self.world
        for step in range(self.start, self.n // step_size):
            lo = step * step_size + self.rank * b
            yield list(zip(perm[lo:lo + b].tolist(), seeds[lo:lo + b].tolist()))


def collate(items: list[tuple]) -> tuple[Tensor | None, Tensor, list[tuple[str, str]]]:
    """``(images, labels, bad)``: the batch of the images that could be read, and ``(path, error)`` of the others."""
    good = [(x, y) for x, y, _ in items if x is not None]
    bad = [bad for x, _, bad in items if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([y for _, y in good], dtype=torch.int64), bad


class ImageFiles(torch.utils.data.Dataset):
    """A split of image files and their labels, streamed through a ``DataLoader`` (:meth:`stream`).

    ``dataset[(index, seed)]`` is ``(image, label, None)``, the transform's randomness drawn from ``seed`` (None:
    the global generator), or ``(None, label, (path, error))`` for a file that cannot be read: the process that
    trains decides (:meth:`check`) whether that stops the run, so the error is one line there, not a worker's
    traceback."""

    streaming: ClassVar[bool] = True

    def __init__(self, samples: Sequence[tuple[str, int]], transform, workers: int = 0,
                 skip_bad: bool = False) -> None:
        self.samples, self.transform, self.workers, self.skip_bad = list(samples), transform, workers, skip_bad
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.int64)
        self.skipped: list[str] = []
        self._loader, self._key = None, None

    def __len__(self) -> int:
        return len(self.samples)

    def to(self, device: torch.device | str) -> ImageFiles:  # streamed: each batch goes to the device on its own
        return self

    def subset(self, positions: Sequence[int], transform=None) -> ImageFiles:
        return ImageFiles([self.samples[i] for i in positions], transform or self.transform, self.workers,
                          self.skip_bad)

    def __getitem__(self, key: tuple[int, int | None]):
        index, seed = key
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except (OSError, ValueError, EOFError) as err:
            return None, label, (path, f"{type(err).__name__}: {err}")
        if seed is None:
            return self.transform(image), label, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label, None

    def check(self, bad: list[tuple[str, str]]) -> None:
        """Stop at an unreadable image (a :class:`DataError` naming it) unless ``skip_bad``: then count it, and
        name the first few on stderr."""
        for path, error in bad:
            if not self.skip_bad:
                raise DataError(f"cannot read image {path} ({error}); remove it, or pass --skip-bad-images to skip "
                                "unreadable images")
            if len(self.skipped) < NAMED_SKIPS:
                print(f"skipped unreadable image {path} ({error})", file=sys.stderr)
            self.skipped.append(path)

    def loader(self, sampler: EpochBatches, device: torch.device) -> torch.utils.data.DataLoader:
        """A loader of the batches ``sampler`` gives: ``workers`` processes kept from epoch to epoch, and on CUDA
        pinned memory and 4 batches prefetched per worker."""
        cuda = device.type == "cuda"
        extra = dict(persistent_workers=True, prefetch_factor=4 if cuda else 2) if self.workers else {}
        return torch.utils.data.DataLoader(self, batch_sampler=sampler, num_workers=self.workers,
                                           collate_fn=collate, pin_memory=cuda, **extra)

    def stream(self, batch: int, device: torch.device, world: int = 1, rank: int = 0, seed: int = 0,
               shuffle: bool = False, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images, labels)`` on the CPU (pinned on CUDA), as :class:`EpochBatches` orders them; the loader (and
        its workers) is kept for the next call with the same arguments."""
        key = (batch, device.type, world, rank, seed, shuffle)
        if self._key != key:
            self._loader, self._key = self.loader(EpochBatches(len(self), batch, world, rank, seed, shuffle),
                                                  device), key
        self._loader.batch_sampler.set_epoch(epoch, start)
        for images, labels, bad in self._loader:
            self.check(bad)
            if images is None:
                raise DataError(f"no image of a batch of {len(bad)} could be read (the first: {bad[0][0]})")
            yield images, labels

    def __getstate__(self) -> dict:  # what a worker process needs: not the loader that starts it
        return dict(self.__dict__, _loader=None, _key=None)


@dataclass
class FolderData(Dataset):
    """A :class:`Dataset` whose splits are :class:`ImageFiles`, streamed to the device batch by batch."""

    streaming: ClassVar[bool] = True
    root: str = ""

    @property
    def in_channels(self) -> int:
        return 3

    def to(self, device: torch.device | str) -> FolderData:
        return self


def folder_options(config: Mapping) -> dict:
    """The keyword arguments of :func:`load_folder` in a run's arguments (``vars(args)`` or a checkpoint's)."""
    return {"image_size": config.get("image_size") or DEFAULT_IMAGE_SIZE, "mean": config.get("mean"),
            "std": config.get("std"), "workers": config.get("workers"),
            "skip_bad": bool(config.get("skip_bad_images"))}


def load_folder(root: str | None, val_size: int = 0, split_seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None, workers: int | None = None,
                skip_bad: bool = False, world: int = 1) -> FolderData:
    """The folder dataset at ``root`` (see the module's description); a one-line :class:`DataError` for anything
    missing, or ``ValueError`` for a ``val_size`` the folder cannot give."""
    require_vision()
    if not root:
        raise DataError("--dataset folder needs --data-dir ROOT, the folder holding train/<class>/... (and "
                        "val/<class>/...)")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"--data-dir {root} has no train/ folder; expected the ImageFolder layout "
                        f"{os.path.join(root, 'train', '<class>', '<image>')} (and val/<class>/<image>)")
    classes = class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {os.path.join(train_dir, '<class>', '<image>')}")
    mean, std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
    workers = default_workers(world) if workers is None else workers
    train_tf, eval_tf = (transform(image_size, mean, std, t) for t in (True, False))
    train = ImageFiles(scan(train_dir, classes, allow_empty=False), train_tf, workers, skip_bad)
    held = [os.path.join(root, name) for name in ("test", "val") if os.path.isdir(os.path.join(root, name))]
    for folder in held:
        check_classes(train_dir, folder, classes)
    test = ImageFiles(scan(held[0], classes, allow_empty=True), eval_tf, workers, skip_bad) if held else None
    val = None
    if val_size:
        rest, out = stratified_split(train.labels.tolist(), val_size, split_seed)
        train, val = train.subset(rest), train.subset(out, eval_tf)
    elif test is None:
        raise DataError(f"--data-dir {root} has no val/ (or test/) folder: pass --val-size N to hold out N "
                        "training images, stratified by class")
    if held and held[0].endswith("test") and len(held) == 2 and val is None:
        val = ImageFiles(scan(held[1], classes, allow_empty=True), eval_tf, workers, skip_bad)
    return FolderData("folder", train, val, test if test is not None else val, classes, mean, std, root=root)
