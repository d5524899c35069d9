"""Counting the kernel launches and host synchronizations of a piece of work, on CPU as on CUDA.

On a GPU a DenseNet step is made of many small kernels, so how many the host launches bounds its speed. That
count can be taken without a GPU: every CUDA kernel a PyTorch program launches comes from an ATen operator (or
a Triton launch), and the profiler records every operator call, nested, also those made from C++.

A **launch** is counted for

* every *leaf* operator event: an ``aten::``/``effdense::``... op none of whose descendants launches, and
  which is not in :data:`NO_KERNEL` (views, metadata, allocation without initialization: no kernel on CUDA);
* every Triton kernel launch. Under ``TRITON_INTERPRET=1`` the interpreter runs the kernel with torch ops of
  its own (argument copies to and from the host); those are inside the launch's range and not counted.

A **host sync** is an ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, a data-dependent
Python branch on a tensor) or a device-to-host copy: on CUDA each waits for the GPU to drain.

**Dry run** (``count_launches(fn, dry_run=True)``): under ``TRITON_INTERPRET=1`` each Triton launch is recorded
and returns at once, without running the kernel (a real DenseNet-BC-40 step in the interpreter takes about a
minute; a dry one a few seconds). The counts are the same as a real run's because nothing the host does
depends on a kernel's output: the launchers and the block code have no data-dependent branches, and outputs a
dry launch leaves unwritten are only read by further launches and ATen ops whose count does not depend on
their values (tests/test_launches.py compares dry and real counts of a training step).

**Block ranges** (:func:`label_blocks`): every :class:`~effdense.EfficientDenseBlock` of a model runs its
forward inside a ``effdense.block.forward`` profiler range and its backward (from the moment the gradient
of the block output is ready until the gradient of its input is) inside ``effdense.block.backward``, so
:meth:`Launches.syncs_in` tells host syncs of the dense blocks from those of the rest of a step.

This is a proxy: a cuDNN convolution may launch two or three kernels for one ``aten::convolution``, and a CPU
implementation can differ from the CUDA one. It compares backends fairly (each op counts once everywhere) and
catches every small op that an eager GPU step would pay a launch (a few microseconds of host time) for.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

#: operators that launch no kernel on CUDA: views and metadata, uninitialized allocation, no-op conversions
NO_KERNEL = frozenset("aten::" + n for n in """
    empty empty_strided empty_like new_empty new_empty_strided view _unsafe_view as_strided as_strided_ slice
    select narrow permute transpose t expand expand_as unsqueeze unsqueeze_ squeeze squeeze_ reshape
    _reshape_alias view_as alias detach detach_ lift_fresh lift_fresh_copy resize_ set_ result_type unbind
    split split_with_sizes chunk contiguous to numpy_T is_nonzero resolve_conj resolve_neg conj _conj
    unfold movedim swapaxes flatten unflatten align_as _nested_tensor_size
    _local_scalar_dense item is_same_size size stride dim
    """.split())
#: operators that wait for the device (``.item()`` and friends)
HOST_SYNC = frozenset({"aten::_local_scalar_dense"})
#: prefix of the profiler range around each Triton launch
TRITON_RANGE = "triton::"
#: prefix of the ranges :func:`label_blocks` opens (no ``::``: a range, not an operator)
BLOCK_RANGE = "effdense.block"


@dataclass
class Launches:
    """What :func:`count_launches` saw: launches per operator (Triton kernels as ``triton::<name>``) and host
    syncs per operator, each with the profiler range names (``record_function``) it happened under."""

    ops: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    sync_ranges: list = field(default_factory=list)   # per host sync: the enclosing range names, outermost first
    ranges: Counter = field(default_factory=Counter)  # how often each :data:`BLOCK_RANGE` range was entered

    def syncs_in(self, prefix: str = BLOCK_RANGE) -> int:
        """Host syncs inside a range whose name starts with ``prefix`` (default: any dense block's)."""
        return sum(any(r.startswith(prefix) for r in ranges) for ranges in self.sync_ranges)

    def top(self, n: int = 8) -> list[list]:
        """The ``n`` operators launching most, as ``[name, count]`` pairs (JSON-friendly)."""
        return [[k, v] for k, v in self.ops.most_common(n)]

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def triton(self) -> int:
        return sum(v for k, v in self.ops.items() if k.startswith(TRITON_RANGE))

    @property
    def aten(self) -> int:
        return self.total - self.triton

    def summary(self, top: int = 12) -> str:
        most = ", ".join(f"{k} {v}" for k, v in self.ops.most_common(top))
        return f"{self.total} launches ({self.aten} ATen + {self.triton} Triton), {sum(self.syncs.values())} " \
               f"host syncs; most: {most}"


@contextlib.contextmanager
def _triton_ranges(dry_run: bool = False) -> Iterator[None]:
    """Wrap every Triton launch in a ``triton::<kernel>`` profiler range (interpreter and compiled kernels).
    With ``dry_run`` an interpreted launch only opens its range: the kernel does not run, its outputs stay
    as they were (see the module docstring for why the counts do not change); a compiled launch raises."""
    patched = []
    try:
        from triton.runtime import interpreter
        grid_call = interpreter.GridExecutor.__call__

        def interpreted(self, *args, **kwargs):
            with record_function(TRITON_RANGE + getattr(self.fn, "__name__", "kernel")):
                return None if dry_run else grid_call(self, *args, **kwargs)

        interpreter.GridExecutor.__call__ = interpreted
        patched.append((interpreter.GridExecutor, "__call__", grid_call))
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction
        run = JITFunction.run

        def compiled(self, *args, **kwargs):
            if dry_run:   # a skipped compiled launch would also skip its compilation and autotuning
                raise RuntimeError("count_launches(dry_run=True) skips Triton launches in the interpreter only "
                                   "(TRITON_INTERPRET=1 before triton is imported); this kernel is compiled")
            with record_function(TRITON_RANGE + self.fn.__name__):
                return run(self, *args, **kwargs)

        JITFunction.run = compiled
        patched.append((JITFunction, "run", run))
    except ImportError:
        pass
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def _is_op(name: str) -> bool:
    return "::" in name and not name.startswith(("autograd::", "torch::autograd", "<"))


def count_launches(fn: Callable[[], object], dry_run: bool = False, warmup: int = 0) -> Launches:
    """Run ``fn`` ``warmup`` times unobserved, then once under the profiler, and count that run's kernel
    launches and host syncs (module docstring). ``dry_run``: interpreted Triton kernels are counted, not run
    (also during warm-up). Synchronizes CUDA before and after, so only ``fn``'s work is seen."""
    with _triton_ranges(dry_run):
        for _ in range(warmup):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return _count(prof.events())


def _count(events) -> Launches:
    """Launches and host syncs of a profile's events (see :func:`count_launches`)."""
    launches_below: dict[int, bool] = {}

    def launches(e) -> bool:          # e or a descendant launches a kernel
        key = id(e)
        if key not in launches_below:
            below = any([launches(ch) for ch in e.cpu_children])
            launches_below[key] = below or (_is_op(e.name) and e.name not in NO_KERNEL)
        return launches_below[key]

    out = Launches()
    for e in events:
        ancestors, p = [], e.cpu_parent
        while p is not None:
            ancestors.append(p.name)
            p = p.cpu_parent
        in_triton = any(a.startswith(TRITON_RANGE) for a in ancestors)
        if e.name.startswith(BLOCK_RANGE):
            out.ranges[e.name] += 1
        if e.name.startswith(TRITON_RANGE) and not in_triton:
            out.ops[e.name] += 1
            continue
        if in_triton or not _is_op(e.name):
            continue
        if e.name in HOST_SYNC or (e.name == "aten::copy_" and _device_to_host(e)):
            out.syncs[e.name] += 1
            out.sync_ranges.append([a for a in reversed(ancestors) if not _is_op(a)])
        if e.name not in NO_KERNEL and not any(launches(ch) for ch in e.cpu_children):
            out.ops[e.name] += 1
    return out


@contextlib.contextmanager
def label_blocks(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within this context each :class:`~effdense.EfficientDenseBlock` of ``model`` (or ``model`` itself)
    runs its forward in a ``effdense.block.forward`` range and its backward in ``effdense.block.backward``.

    The backward range opens in a hook on the block output's gradient and closes in a hook on the block
    input's gradient, which autograd calls once the block's backward has produced it: between the two run only
    the block's own backward nodes (and the gradient accumulation of its parameters). A block whose input
    needs no gradient gets no backward range (there is no hook to close it)."""
    from ..block import EfficientDenseBlock

    blocks = [m for m in model.modules() if isinstance(m, EfficientDenseBlock)]

    def labelled(block: EfficientDenseBlock) -> Callable:
        forward = block.forward

        def run(x: torch.Tensor) -> torch.Tensor:
            with record_function(BLOCK_RANGE + ".forward"):
                out = forward(x)
            if torch.is_grad_enabled() and x.requires_grad and out.requires_grad:
                rng = record_function(BLOCK_RANGE + ".backward")

                def enter(grad: torch.Tensor) -> None:
                    rng.__enter__()

                def leave(grad: torch.Tensor) -> None:
                    rng.__exit__(None, None, None)

                out.register_hook(enter)
                x.register_hook(leave)
            return out
        return run

    for block in blocks:
        block.forward = labelled(block)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward    # the instance attribute: the class's forward shows again


def _device_to_host(event) -> bool:
    """Whether a ``copy_`` event moved data from an accelerator to the host (a sync), from its CUDA
    children when there are any; on CPU-only runs there are none."""
    return any("DtoH" in getattr(k, "name", "") for k in getattr(event, "kernels", []))
