"""A run's ``--output-dir`` belongs to that run: created and probed before any compute, locked while the run lives,
refused when it holds another run's files (unless ``--resume`` or ``--overwrite``), and checked for room.

The lock is ``<dir>/.lock``, created with ``O_CREAT | O_EXCL`` and holding ``{"pid", "host", "started"}``; it is
removed on exit (``try``/``finally`` and ``atexit``). A lock whose process is gone (same host, ``os.kill(pid, 0)``
raises ``ProcessLookupError``) is stale and taken over with a note; any other lock refuses. Every failure is one
line (``SystemExit``).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import time

from torch import nn

try:
    import resource  # POSIX: the file-size limit
except ImportError:  # pragma: no cover - Windows
    resource = None

from .checkpoints import RUN_FILES

LOCK = ".lock"
#: everything a run writes into its folder (``tb/`` is TensorBoard's); ``--overwrite`` deletes these
OWNED = (*RUN_FILES, "tb")
#: room kept free beyond the checkpoints, for the logs and curves
MARGIN = 16 * 2**20
_HELD: set[str] = set()  # lock files this process holds (a lock naming our pid that we do not hold is stale)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"effdense-train: {message}")


def _size(n: float) -> str:
    """Bytes for people: 24.1 KiB, 1.0 MiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _why(err: OSError) -> str:
    return err.strerror or type(err).__name__


def create_and_probe(folder: str) -> None:
    """Create ``folder`` and write, fsync and delete a probe file in it: a folder that cannot take a checkpoint
    fails now, in one line, not after the first epoch."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise _fail(f"--output-dir {folder} cannot be created ({_why(err)}: {err.filename}); expected a folder "
                    "that can be written") from None
    if not os.path.isdir(folder):
        raise _fail(f"--output-dir {folder} is not a folder")
    probe = os.path.join(folder, f".write-probe.{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"effdense")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        raise _fail(f"--output-dir {folder} cannot be written ({_why(err)}); expected a folder this process can "
                    "write checkpoints into") from None


class RunLock:
    """``<folder>/.lock`` held by this process; :meth:`release` (also at exit) removes it if it is still ours."""

    def __init__(self, folder: str, say=print) -> None:
        self.path = os.path.join(os.path.abspath(folder), LOCK)
        self.text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for _ in range(3):  # a stale lock taken over, or one released meanwhile: try again
            if self._create():
                break
            self._take_over_if_stale(say)
        else:
            raise _fail(f"could not take the lock {self.path}: other processes keep taking it")
        _HELD.add(self.path)
        atexit.register(self.release)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise _fail(f"cannot create the lock {self.path} ({_why(err)})") from None
        with os.fdopen(fd, "w") as f:
            f.write(self.text)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over_if_stale(self, say) -> None:
        """Remove the lock there if its process is gone; else refuse in one line naming its owner."""
        try:
            with open(self.path) as f:
                seen = f.read()
        except FileNotFoundError:
            return
        owner = _owner(seen)
        if owner is None:
            raise _fail(f"{os.path.dirname(self.path)} is locked by another run ({self.path} is unreadable: being "
                        "written, or left by a killed process; delete it if no run uses the folder)")
        pid, host = owner
        if not _is_stale(self.path, pid, host):
            raise _fail(f"{os.path.dirname(self.path)} is in use by another run (process {pid} on {host}, lock "
                        f"{self.path}); wait for it, or choose another --output-dir")
        grave = f"{self.path}.stale.{os.getpid()}"
        try:  # atomic: of two processes taking over, one moves the stale lock, the other finds it gone
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        with open(grave) as f:
            moved = f.read()
        if moved != seen:  # the lock was retaken meanwhile: put it back, and refuse
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.path)
            os.unlink(grave)
            raise _fail(f"{os.path.dirname(self.path)} is in use by another run (lock {self.path})")
        os.unlink(grave)
        say(f"took over the stale lock {self.path} of process {pid} on {host}, which has ended")

    def release(self) -> None:
        """Remove the lock if it still holds this process's record."""
        if self.path not in _HELD:
            return
        _HELD.discard(self.path)
        atexit.unregister(self.release)
        with contextlib.suppress(OSError):
            with open(self.path) as f:
                mine = f.read() == self.text
            if mine:
                os.unlink(self.path)


def _owner(text: str) -> tuple[int, str] | None:
    """``(pid, host)`` from a lock file's text, or None when it is not a lock's JSON."""
    try:
        record = json.loads(text)
        return int(record["pid"]), str(record["host"])
    except (ValueError, KeyError, TypeError):
        return None


def _is_stale(path: str, pid: int, host: str) -> bool:
    """A lock of a process on this host that has ended (or of this very process, which does not hold it)."""
    if host != socket.gethostname():
        return False  # another host's process cannot be checked: assume it lives
    if pid == os.getpid():
        return path not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def claim(folder: str, resume: bool, overwrite: bool, say=print) -> RunLock:
    """Make ``folder`` this run's: create and probe it, lock it, and refuse (or with ``overwrite`` delete) another
    run's files there when not resuming."""
    create_and_probe(folder)
    lock = RunLock(folder, say)
    try:
        found = [name for name in OWNED if os.path.lexists(os.path.join(folder, name))]
        if found and not resume:
            if not overwrite:
                raise _fail(f"--output-dir {folder} holds another run's files ({', '.join(found)}): continue that run "
                            "with --resume, choose another --output-dir, or pass --overwrite to delete them")
            for name in found:
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            say(f"--overwrite: deleted the previous run's {', '.join(found)} in {folder}")
    except BaseException:
        lock.release()
        raise
    return lock


def checkpoint_bytes(model: nn.Module, opt, momentum: float) -> int:
    """The tensors a checkpoint holds, in bytes: parameters, buffers and the optimizer's state (SGD's momentum
    buffers, one per parameter, when they do not exist yet)."""
    params = sum(p.nbytes for p in model.parameters())
    buffers = sum(b.nbytes for b in model.buffers())
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if hasattr(t, "nbytes"))
    return params + buffers + (state if opt.state or momentum == 0 else params)


def check_room(folder: str, size: int) -> None:
    """Refuse in one line when ``folder``'s free space, or the file-size limit, cannot take the checkpoints:
    last.pt, best.pt and the temporary copy an atomic save writes beside one (3 x ``size``, less what last.pt and
    best.pt already take), plus :data:`MARGIN`."""
    existing = sum(os.path.getsize(p) for p in (os.path.join(folder, n) for n in ("last.pt", "best.pt"))
                   if os.path.isfile(p))
    need = max(3 * size - existing, 0) + MARGIN
    free = shutil.disk_usage(folder).free
    if free < need:
        raise _fail(f"--output-dir {folder} has {_size(free)} free, but the run needs about {_size(need)} (last.pt, "
                    f"best.pt and a temporary copy of {_size(size)} each, plus {_size(MARGIN)} for logs)")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    if limit not in (None, getattr(resource, "RLIM_INFINITY", None)) and limit < size + MARGIN:
        raise _fail(f"the file-size limit (ulimit -f) of {_size(limit)} is below a checkpoint's predicted "
                    f"{_size(size)}; raise it, or the first save into --output-dir {folder} fails")
