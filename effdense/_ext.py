"""Loading the C++/CUDA extension ``effdense._C`` and recording why it is not there.

Importing ``effdense._C`` registers the ``torch.ops.effdense`` operators (csrc/). The library is looked for in
the package directory (an install, an in-place build, a prebuilt library copied there), then in the per-ABI
folder of the torch extensions cache that ``python -m effdense.build_ext`` fills when the package directory is
read-only (:mod:`effdense._build`). The manifest beside a library records the PyTorch build it was compiled
against: a library for another Python, torch version, torch git hash or CUDA version is not loaded (a C++ ABI
mismatch can crash rather than fail), and the reason names the command that rebuilds it;
``EFFDENSE_AUTO_BUILD=1`` rebuilds it at import instead, saying why. A library built from other sources than
the checkout's ``csrc/`` loads, with a warning that it is stale. :func:`status` says which of these happened.

The package works without the extension: :func:`reason` then says why (not built, a failed build recorded in
``effdense/_C.build-error`` by setup.py, a manifest for another PyTorch, an import error) and the ``"cpp"``
backend reports it as its reason for being unavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import torch

from . import _build

#: the loaded extension module, or None
C = None
#: why the extension is not loaded ("" when it is)
ERROR = ""
#: the library file found (loaded or not), or None
LIBRARY: str | None = None
#: how the library was chosen: its manifest matches, is stale, is absent, or it was rebuilt at import
NOTE = ""

_PKG = os.path.dirname(os.path.abspath(__file__))
_AUTO = "EFFDENSE_AUTO_BUILD"


def _build_error() -> str:
    try:
        with open(os.path.join(_PKG, "_C.build-error"), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _import(path: str):
    """Import the library at ``path`` as ``effdense._C`` (registers the ops)."""
    if os.path.dirname(os.path.abspath(path)) == _PKG:
        return importlib.import_module("._C", __package__)
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return mod


def _auto_build(why: str) -> str | None:
    """With ``EFFDENSE_AUTO_BUILD=1``: rebuild (saying why) and return the new library, else None."""
    if not _build.env_flag(_AUTO):
        return None
    print(f"effdense: {_AUTO}=1: building {_build.EXT_NAME} ({why})", file=sys.stderr, flush=True)
    return _build.build(builder=f"{_AUTO}=1 import")


def _check(path: str) -> tuple[str | None, str]:
    """(the library to load or None, why not / how it was chosen) for the library found at ``path``."""
    manifest = _build.read_manifest(path)
    if manifest is None:
        return path, "no manifest (an older build)"
    diff, stale = _build.compare(manifest, csrc=_build.find_csrc())
    if diff:
        why = f"{path} was built for another PyTorch: " + "; ".join(diff)
        rebuilt = _auto_build(why)
        return (rebuilt, f"rebuilt at import: {why}") if rebuilt else (None, why)
    if stale:
        rebuilt = _auto_build("stale: " + "; ".join(stale))
        if rebuilt:
            return rebuilt, "rebuilt at import: stale: " + "; ".join(stale)
        warnings.warn(f"effdense._C at {path} is stale: {'; '.join(stale)}; rebuild it with "
                      f"`{_build.COMMAND}`", stacklevel=2)
        return path, "stale: " + "; ".join(stale)
    return path, "its manifest matches this environment: " + _build.describe(manifest)


def _init() -> None:
    global C, ERROR, LIBRARY, NOTE
    try:
        LIBRARY = _build.installed_library()
        if LIBRARY is None:
            LIBRARY = _auto_build("not built")
            if LIBRARY is None:
                ERROR = "not built: " + (_build_error() or "no effdense/_C library (a pure Python install, or "
                                                            "EFFDENSE_SKIP_EXT=1)")
                return
            NOTE = "built at import"
        else:
            LIBRARY, NOTE = _check(LIBRARY)
            if LIBRARY is None:
                ERROR = "not loaded: " + NOTE
                return
        C = _import(LIBRARY)  # registers torch.ops.effdense.*
    except Exception as err:  # noqa: BLE001 - any failure leaves the package importable, with the reason
        ERROR = f"failed to load: {type(err).__name__}: {err}"


_init()


def available() -> bool:
    """True when ``effdense._C`` is loaded and its operators are registered."""
    return C is not None


def reason() -> str | None:
    """None when the extension is loaded, else ``"effdense._C not built: ...; build it with `python -m
    effdense.build_ext`"`` (or ``not loaded``/``failed to load``)."""
    if C is not None:
        return None
    hint = "" if _build.COMMAND in ERROR else f"; build it with `{_build.COMMAND}`"
    return f"effdense._C {ERROR}{hint}"


def status() -> str:
    """One line: which library is loaded and why (its manifest matches, stale, rebuilt), or why none is."""
    if C is None:
        return reason()
    kind = "CUDA and CPU kernels" if has_cuda_kernels() else "CPU kernels only"
    return f"effdense._C loaded ({kind}) from {LIBRARY}: {NOTE}"


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("effdense::dense_block_forward", "CUDA")
