"""Measuring the activation memory of a training step, on CPU as on CUDA.

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
from dataclasses import dataclass, replace

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


def release_workspaces() -> None:
    """Free the scratch memory a backend keeps across steps (the ``cpp`` backend's CPU workspace)."""
    from .backends import cpp_backend  # noqa: PLC0415 - the backend registry imports this module's users

    cpp_backend.release_workspace()


def measure_step(step: Callable[[], object], device: torch.device | str) -> StepMemory:
    """Peak memory that ``step()`` adds on ``device`` (allocator statistics on CUDA, :class:`CPUAllocatorBytes`
    on CPU).

    Run a warm-up step first so gradients and optimizer state already exist: then the figure is the step's
    activation memory plus its transients. Workspaces a backend keeps across steps are released first
    (:func:`release_workspaces`), so the step allocates them again and the peak includes them, at the size they
    are held at between steps (the ``cpp`` backend's forward reserves its backward's workspace).
    """
    device = torch.device(device)
    release_workspaces()
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


@dataclass(frozen=True)
class BlockShape:
    pixels: int      # H*W of one image at this block
    c0: int          # input channels
    layers: int
    k: int           # growth rate
    b: int           # bottleneck width (0 for plain layers)
    keep: bool = False   # bottlenecks kept for backward (EfficientDenseBlock.keep_bottleneck, the cpp backend)

    @property
    def c(self) -> int:
        return self.c0 + self.layers * self.k


def block_shapes(model: torch.nn.Module, size: int) -> list[BlockShape]:
    """The dense blocks of an :class:`~effdense.EfficientDenseNet` on ``size`` x ``size`` inputs."""
    from .block import EfficientDenseBlock  # noqa: PLC0415 - memory.py is imported by the block's users only

    out, hw = [], size
    if hasattr(model.features, "pool0"):
        hw = ((hw + 1) // 2 + 1) // 2                  # 7x7/2 conv, then 3x3/2 max-pool (padding 3 and 1)
    for name, m in model.features.named_children():
        if isinstance(m, EfficientDenseBlock):
            b = m.denselayer1.conv1.out_channels if m.bottleneck else 0
            out.append(BlockShape(hw * hw, m.num_input_features, len(m), m.growth_rate, b,
                                  bool(b and m.keep_bottleneck)))
        elif name.startswith("transition"):
            hw //= 2
    return out


def predicted_activation_bytes(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype,
                               kind: str, device: torch.device | str = "cpu") -> int:
    """Dense-block activation memory of one training step, predicted from the model's layout.

    ``kind`` is ``"naive"``, ``"checkpoint"``, ``"efficient"`` or ``"fused"``. With ``P`` pixels, ``c_l = C0 + l*k``,
    ``C = C0 + L*k``, ``e`` bytes per stored element and ``g`` per gradient element (fp32 for fp16/bf16):
    what is kept for backward, summed over blocks, plus the worst block's backward transients.

    * kept, naive: each layer's concatenation and BN-ReLU output (``2 c_l``), its bottleneck and that
      bottleneck's BN-ReLU output (``2B``) and its ``k`` new channels, plus the block's concatenated output;
      checkpoint: per layer only ``2B`` (what norm2/conv2 keep), plus the feature maps and the output (``2C``);
      efficient and fused: the feature buffer ``C``.
    * transients, every kind: the gradients of the block's features and of one layer's input and bottleneck,
      ``3C*g + 2B*g``; checkpoint adds the recomputed concatenation and BN-ReLU output (``2C*e``), efficient the
      recomputed BN-ReLU input and bottleneck (``C*e + 2B*e``).
    * fused, the ``cpp`` driver (on CPU unless ``device`` is CUDA), whose BN-ReLU-conv tiles stay in cache and
      add their input gradients into one gradient buffer: during block ``j``'s backward (last block first) the
      feature buffers of blocks ``1..j``, the gradient of block ``j``'s features it receives (``C*g``) and the
      driver's workspace, which a forward with a backward to come takes at its backward's size and which is then
      held at the largest such size (block 1's, the most pixels): the gradient buffer, the new channels'
      gradient, the recomputed bottleneck and its BN-ReLU output (whose buffer takes the bottleneck's gradient),
      ``C*g + k*e + 2B*e``. A
      block that keeps its bottlenecks keeps ``L*B`` more, alive until its own backward, and its workspace needs
      one ``B*e`` less. On CUDA (``device``) each block call takes its own workspace from the caching allocator,
      and cuDNN writes the bottleneck's gradient (``B*g``) beside it.

    Stem, transitions and classifier are the same for every backend and left out.
    """
    if kind not in ("naive", "checkpoint", "efficient", "fused"):
        raise ValueError(f"kind must be 'naive', 'checkpoint', 'efficient' or 'fused', got {kind!r}")
    e = torch.finfo(dtype).bits // 8
    g = max(e, 4)
    shapes = block_shapes(model, size)
    if kind == "fused":
        return _fused_peak(shapes, batch, e, g, [s.keep for s in shapes], torch.device(device).type == "cpu")
    kept, worst = 0, 0
    for s in shapes:
        p = batch * s.pixels
        if kind == "efficient":
            kept += p * s.c * e
            extra = s.c * e + 2 * s.b * e
        elif kind == "checkpoint":
            kept += p * (2 * s.c + s.layers * 2 * s.b) * e
            extra = 2 * s.c * e
        else:
            kept += p * (sum(2 * (s.c0 + i * s.k) + 2 * s.b + s.k for i in range(s.layers)) + s.c) * e
            extra = 0
        worst = max(worst, p * (3 * s.c * g + 2 * s.b * g + extra))
    return kept + worst


def _fused_peak(shapes: list[BlockShape], batch: int, e: int, g: int, keep: list[bool], held: bool) -> int:
    """The ``"fused"`` prediction of :func:`predicted_activation_bytes`, blocks keeping bottlenecks per ``keep``,
    with the workspace ``held`` at its largest size (CPU) or taken per block call (CUDA)."""
    pixels = [batch * s.pixels for s in shapes]
    own = [p * (s.c * g + s.k * e + (1 if kp else 2) * s.b * e) for s, kp, p in zip(shapes, keep, pixels)]
    most = max(own, default=0)
    alive, worst = 0, 0
    for s, kp, p, ws in zip(shapes, keep, pixels, own):   # block j's backward: blocks 1..j hold their buffers
        alive += p * s.c * e + (p * s.layers * s.b * e if kp else 0)
        worst = max(worst, alive + p * s.c * g + (most if held else ws + p * s.b * g))
    return worst


def bottleneck_plan(model: torch.nn.Module) -> list[bool]:
    """Per dense block of ``model``, whether its ``cpp`` backward should read kept bottlenecks instead of recomputing
    them (``EfficientDenseBlock.keep_bottleneck``): yes where keeping them does not raise the predicted fp32 peak
    of a training step above that of recomputing everywhere, with each block call's own workspace (what the
    algorithm needs, and what the CUDA driver takes). The CPU driver holds its workspace at block 1's backward size
    for the whole step, so there kept bottlenecks of block 2 raise the allocator's peak, but not the resident
    memory the step adds (glibc's heap holds that much either way; ``benchmarks.rss``). Chosen greedily from the
    last block (fewest pixels, so the cheapest to keep) to the first; the answer does not depend on batch or image
    size (every term scales with the pixels, in fixed ratios between blocks), so it is taken at a size that halves
    exactly."""
    shapes = [replace(s, keep=False) for s in block_shapes(model, 2 ** (len(block_shapes(model, 1)) + 6))]
    keep = [False] * len(shapes)
    base = _fused_peak(shapes, 1, 4, 4, keep, held=False)
    for j in reversed(range(len(shapes))):
        trial = keep[:j] + [bool(shapes[j].b)] + keep[j + 1:]
        if _fused_peak(shapes, 1, 4, 4, trial, held=False) <= base:
            keep = trial
    return keep
