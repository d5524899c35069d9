"""Crash-safe checkpoint files and the random-number state a resumed run needs.

Every file is written to a temporary file in the destination folder, flushed and fsynced, then renamed over
the destination with :func:`os.replace` (atomic on POSIX and Windows), so a kill at any moment leaves
either the old file or the new one, never a truncated one. The file gets the permissions ``open()`` would give
it (``0o666`` less the umask), not ``mkstemp``'s owner-only ``0o600``; a killed write leaves its temporary file
(``.last.pt.XXXX.tmp``), which :func:`remove_stale_temporaries` deletes.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch


_UMASK_LOCK = threading.Lock()
TMP_SUFFIX = ".tmp"
#: files a run writes into its --output-dir (through atomic temporary files)
RUN_FILES = ("last.pt", "best.pt", "log.csv", "log.json", "results.json", "curves.png")


def _umask() -> int:
    """The process umask (it can only be read by setting it: set and restore under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        if hasattr(os, "fchmod"):  # POSIX: mkstemp's 0o600 -> what open() would create
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temporaries(folder: str | os.PathLike, names) -> list[str]:
    """Delete the temporary files :func:`atomic_write` leaves when killed mid-write (``.NAME.XXXXXXXX.tmp`` for each
    of ``names``) in ``folder``; returns the deleted names. Call it only where no other process writes ``names``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    pattern = re.compile(r"^\.(?:" + "|".join(re.escape(n) for n in names) + r")\.[^/]+" + re.escape(TMP_SUFFIX) + "$")
    removed = []
    for entry in sorted(os.listdir(folder)):
        if pattern.match(entry):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
                removed.append(entry)
    return removed


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def rng_state() -> dict[str, Any]:
    """The state of every generator a training step draws from: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the training command, with an error naming the file if it is unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RuntimeError(f"checkpoint {path} is not an effdense training checkpoint (no 'model' entry)")
    return ckpt
