"""The record every backend registers: what it is, how it runs a block, and why it cannot run somewhere."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    memory_efficient: bool
    #: ``forward(x, layers) -> Tensor``: the block's output ``[N, C0 + L*k, H, W]`` for input ``x`` and the
    #: block's layer modules (``norm1``, ``conv1``[, ``norm2``, ``conv2``], ``drop_rate``, ``training``)
    forward: Callable[[Tensor, Sequence[nn.Module]], Tensor]
    #: ``unavailable(device, dtype)``: None when the backend can run there, else the reason it cannot
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    #: device types on which ``"auto"`` may pick it (an interpreter-only CPU path is for debugging, not speed)
    auto_devices: tuple[str, ...] = ("cpu", "cuda")
    #: whether its batch statistics follow :func:`effdense.backends.bn.enable_sync_stats` (``--sync-bn``)
    sync_stats: bool = False
    #: ``transition(x, norm, conv) -> Tensor``: its BN-ReLU-AvgPool-Conv1x1 transition, or None for PyTorch's
    transition: Callable[[Tensor, nn.BatchNorm2d, nn.Conv2d], Tensor] | None = None
    #: the block attributes ``forward`` also takes, as keywords (``keep_bottleneck``); other backends ignore them
    options: tuple[str, ...] = ()


def float_only(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype in FLOAT_DTYPES else f"dtype {dtype} is not a floating-point dtype"


def broken(name: str, error: BaseException) -> Backend:
    """A backend whose module failed to import: it never runs and says why."""
    reason = f"import failed: {type(error).__name__}: {error}"

    def forward(x: Tensor, layers: Sequence[nn.Module]) -> Tensor:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")

    return Backend(name, "unavailable", True, forward, lambda device, dtype: reason)
