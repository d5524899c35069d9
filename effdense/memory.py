"""Measuring the activation memory of a training step, on CPU as on CUDA.

On CUDA the caching allocator counts for us (``torch.cuda.max_memory_allocated``). On CPU there is no such
counter, so :class:`LiveBytes` counts the bytes of every tensor storage that ATen allocates while it is
active (a ``TorchDispatchMode`` sees each op's outputs, in forward and in backward) and forgets each storage
when it is freed (a weak reference on the storage). Its peak is the most bytes alive at once: the
activations kept for backward plus the transients of the worst moment, not just the saved tensors.
Allocations an op makes and frees internally (e.g. a convolution's workspace) are not seen.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Context manager: ``live`` and ``peak`` bytes of the storages allocated inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.live += size
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


@dataclass
class StepMemory:
    peak_bytes: int          # most bytes alive at once during the step, beyond what was alive before it
    device: str

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2 ** 20


def measure_step(step: Callable[[], object], device: torch.device | str) -> StepMemory:
    """Peak memory that ``step()`` adds on ``device`` (allocator statistics on CUDA, :class:`LiveBytes` on CPU).

    Run a warm-up step first so gradients and optimizer state already exist: then the figure is the step's
    activation memory plus its transients.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return StepMemory(torch.cuda.max_memory_allocated(device) - base, str(device))
    with LiveBytes() as counter:
        step()
    return StepMemory(counter.peak, str(device))


def training_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                  optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A closure running one forward + backward + optimizer step with cross-entropy loss."""
    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
    return step
