"""Backend registry and dispatch.

Every backend runs the same dense block (same parameters, same ``state_dict``) and says why it cannot run
on a given device and dtype, as xformers' dispatch does. ``"auto"`` picks the first memory-efficient backend
in :data:`AUTO_ORDER` that can run (fastest first); ``EFFDENSE_BACKEND`` overrides ``"auto"``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import bn, naive, torch_backend
from .base import Backend, broken, float_only

BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


# naive and checkpoint call the BN modules, which nn.SyncBatchNorm replaces for cross-process statistics
register(Backend("naive", "torchvision's eager concatenation (quadratic memory)", False,
                 naive.block_forward, float_only, sync_stats=True))
register(Backend("checkpoint", "torchvision's memory_efficient=True: torch.utils.checkpoint around "
                 "concat-BN-ReLU-conv1", False,
                 lambda x, layers: naive.block_forward(x, layers, use_checkpoint=True), float_only, sync_stats=True))
register(Backend("torch", "shared feature buffer, shared statistics, recomputation; plain PyTorch", True,
                 torch_backend.block_forward, float_only, sync_stats=True))

# Kernel backends live in their own modules, each exposing ``BACKEND``; one that fails to import is
# still listed, with the import error as its reason.
for _name, _module in (("cpp", "cpp_backend"), ("triton", "triton_backend")):
    if importlib.util.find_spec(f"{__name__}.{_module}") is None:
        continue
    try:
        register(importlib.import_module(f".{_module}", __name__).BACKEND)
    except Exception as _err:  # noqa: BLE001 - any failure makes the backend unavailable, with the reason
        register(broken(_name, _err))

#: "auto" tries these in order (fastest memory-efficient backend first); later backends register here too
AUTO_ORDER: list[str] = ["triton", "cpp", "torch"]
ENV_VAR = "EFFDENSE_BACKEND"


def names() -> list[str]:
    return list(BACKENDS) + ["auto"]


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str | None:
    """None if backend ``name`` can run on ``device``/``dtype``, else why it cannot."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known: {', '.join(names())}"
    if bn.sync_stats_enabled() and not BACKENDS[name].sync_stats:
        return ("cross-process batch statistics (--sync-bn) are not implemented here; the torch, triton and cpp "
                "backends have them")
    return BACKENDS[name].unavailable(torch.device(device), dtype)


def check_name(name: str) -> str:
    """``name`` if it is a backend or ``"auto"`` (then ``EFFDENSE_BACKEND`` is checked too: a bad value fails where
    a model is built, not at its first forward), else ``ValueError``."""
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(names())}")
    if name == "auto":
        env_override()
    return name


def env_override() -> str | None:
    """The backend ``EFFDENSE_BACKEND`` names in place of ``"auto"``, None when unset (or ``auto``); a value that is
    no backend raises ``ValueError`` naming the variable."""
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r}: unknown backend {env!r}; expected one of {', '.join(names())} "
                         f"(or unset it)")
    return env


def resolve(name: str, device: torch.device | str, dtype: torch.dtype) -> Backend:
    """The backend that runs for a requested ``name`` on ``device``/``dtype``.

    An explicitly named backend that cannot run raises, listing why; ``"auto"`` (or the ``EFFDENSE_BACKEND``
    environment variable, which overrides it) falls back along :data:`AUTO_ORDER`.
    """
    device = torch.device(device)
    if name == "auto":
        env = env_override()
        if env is not None:
            return resolve(env, device, dtype)
        reasons = []
        for candidate in AUTO_ORDER:
            why = unavailable_reason(candidate, device, dtype)
            if why is None and device.type not in BACKENDS[candidate].auto_devices:
                why = f"'auto' does not pick it on {device.type}"
            if why is None:
                return BACKENDS[candidate]
            reasons.append(f"{candidate}: {why}")
        raise RuntimeError(f"no backend can run on {device} with {dtype}: " + "; ".join(reasons))
    check_name(name)
    why = unavailable_reason(name, device, dtype)
    if why is not None:
        others = [f"{n}: {unavailable_reason(n, device, dtype) or 'available'}" for n in BACKENDS if n != name]
        raise RuntimeError(f"backend {name!r} cannot run on {device} with {dtype}: {why}. "
                           f"Other backends: {'; '.join(others)}")
    return BACKENDS[name]
