"""Loading the C++/CUDA extension ``effdense._C`` and recording why it is not there.

Importing ``effdense._C`` registers the ``torch.ops.effdense`` operators (csrc/). The package works without
it: :data:`ERROR` then says why (not built, a failed build recorded in ``effdense/_C.build-error`` by
setup.py, or an import error such as a PyTorch ABI mismatch) and the ``"cpp"`` backend reports it as its
reason for being unavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

#: the loaded extension module, or None
C = None
#: why the extension is not loaded ("" when it is)
ERROR = ""


def _build_error() -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.build-error")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


if importlib.util.find_spec(f"{__package__}._C") is None:
    ERROR = _build_error() or ("not built (install with `pip install --no-build-isolation .`, without "
                               "EFFDENSE_SKIP_EXT=1)")
else:
    try:
        C = importlib.import_module("._C", __package__)  # registers torch.ops.effdense.*
    except Exception as _err:  # noqa: BLE001 - any failure leaves the package importable, with the reason
        ERROR = f"{type(_err).__name__}: {_err}"


def available() -> bool:
    """True when ``effdense._C`` is loaded and its operators are registered."""
    return C is not None


def reason() -> str | None:
    """None when the extension is loaded, else ``"effdense._C not built: ..."`` / ``"... failed to load: ..."``."""
    if C is not None:
        return None
    verb = "not built" if ERROR.startswith(("not built", "building")) else "failed to load"
    detail = ERROR.removeprefix("not built ").strip()
    return f"effdense._C {verb}: {detail}" if detail else f"effdense._C {verb}"


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("effdense::channel_stats", "CUDA")
