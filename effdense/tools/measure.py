"""Measuring the activation memory of a training step, on CPU as on CUDA (the prediction is
:mod:`effdense.memory`).

On CUDA the caching allocator counts for us (``torch.cuda.max_memory_allocated``). On CPU there is no such
counter; two independent ones here:

* :class:`CPUAllocatorBytes` (used by :func:`measure_step`): the profiler's record of every allocation and
  free of PyTorch's CPU allocator, summed in time order. It sees everything, also the buffers an op (a
  convolution, or the ``cpp`` backend's whole-block op) allocates and frees inside itself.
* :class:`LiveBytes`: the bytes of every tensor storage an ATen op returns while it is active (a
  ``TorchDispatchMode`` sees each op's outputs, in forward and in backward), forgotten when the storage is freed
  (a weak reference). It sees only op outputs, not an op's internal buffers; the tests check that the two agree
  where that makes no difference.

Either peak is the most bytes alive at once: the activations kept for backward plus the transients of the
worst moment, not just the saved tensors.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import release_workspace


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


class CPUAllocatorBytes:
    """Context manager: ``peak`` bytes allocated by PyTorch's CPU allocator inside it, beyond what was live
    on entry (from the profiler's memory events)."""

    def __init__(self) -> None:
        self.peak = 0
        self.live = 0

    def __enter__(self) -> CPUAllocatorBytes:
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        for e in sorted(events, key=lambda e: e.start_ns()):
            self.live += e.nbytes()
            self.peak = max(self.peak, self.live)


@dataclass
class StepMemory:
    peak_bytes: int          # most bytes alive at once during the step, beyond what was alive before it
    device: str

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2 ** 20


def measure_step(step: Callable[[], object], device: torch.device | str) -> StepMemory:
    """Peak memory that ``step()`` adds on ``device`` (allocator statistics on CUDA, :class:`CPUAllocatorBytes`
    on CPU).

    Run a warm-up step first so gradients and optimizer state already exist: then the figure is the step's
    activation memory plus its transients. Workspaces a backend keeps across steps are released first
    (:func:`effdense.release_workspace`), so the step allocates them again and the peak includes them, at the size they
    are held at between steps (the ``cpp`` backend's forward reserves its backward's workspace).
    """
    device = torch.device(device)
    release_workspace()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return StepMemory(torch.cuda.max_memory_allocated(device) - base, str(device))
    with CPUAllocatorBytes() as counter:
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
