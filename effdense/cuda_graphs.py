"""A whole training step — forward, loss, backward, optimizer step — captured once as a CUDA graph and replayed
for every batch of the same shape.

Why: on a GPU a DenseNet-BC step is hundreds of small kernels, and each eager launch costs the host a few
microseconds, often more than the kernel itself runs. A replayed graph launches all of them with one call.

How (:class:`GraphedStep`, PyTorch's "whole network capture" recipe):

1. The step runs on static tensors: every batch is copied into the same input and target tensors, and the
   loss and output of a replay are the same tensors every time (overwritten by the next step).
2. A few warm-up steps run on a side stream first (lazy initialization, cuDNN/cuBLAS workspaces, the
   optimizer's state), then everything they changed is put back: parameters, buffers (BN running statistics,
   ``num_batches_tracked``), random-number states, and optimizer state (state that existed before is restored;
   state the warm-up created is zeroed: for SGD without dampening a zero momentum buffer gives exactly the first
   step's ``buf = grad``, for Adam/AdamW zero moments and step count are their initial state). So the first
   replay is the first training step, and replayed steps equal eager steps.
3. The step is captured with the gradients set to None (backward allocates them from the graph's pool).

What a captured step needs (checked; each failure is a one-line error): the same shapes every step; no host
synchronization inside the step (no ``.item()``, no ``GradScaler``, whose inf checks read the device; BN
``momentum=None``, whose factor is read from ``num_batches_tracked``, is such a sync); random numbers drawn
on the device only (the CUDA generator is registered with the graph, so dropout draws new masks each replay;
a number drawn on the host during capture would be replayed forever, so a changed CPU generator state after
capture is an error); and an optimizer whose hyperparameters live on the device, so that a learning-rate
schedule still reaches the graph: :func:`make_capturable` turns each ``lr`` into a device tensor (schedulers
fill it in place) and selects fused SGD (``torch._fused_sgd_`` reads a device ``lr`` without a sync) or
capturable Adam/AdamW.

:func:`compiled_step` is the ``torch.compile(mode="reduce-overhead")`` alternative: inductor's CUDA-graph trees
capture the compiled forward and backward; the fused optimizer step stays eager (one multi-tensor kernel).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: optimizers :func:`make_capturable` knows how to run inside a graph
CAPTURABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """Make ``optimizer`` safe to capture, in place: each group's ``lr`` a 0-d tensor on ``device`` (the same
    tensor from then on: ``torch.optim.lr_scheduler`` fills it in place), SGD fused, Adam/AdamW capturable."""
    if not isinstance(optimizer, CAPTURABLE):
        raise ValueError(f"CUDA-graph capture supports {', '.join(c.__name__ for c in CAPTURABLE)}, "
                         f"got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            if group["momentum"] and group["dampening"]:
                raise ValueError("CUDA-graph capture needs SGD dampening=0 (a zero momentum buffer then equals "
                                 f"SGD's first step), got dampening={group['dampening']}")
            group["fused"], group["foreach"] = True, False
        else:
            group["capturable"] = True
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and lr.device == torch.device(device) and lr.dim() == 0):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32 if device.type != "cpu" else torch.float64,
                                       device=device)
    return optimizer


def _check_model(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None:
            raise ValueError(f"{name or type(m).__name__}: BatchNorm momentum=None reads num_batches_tracked on "
                             "the host every step and cannot be captured; give it a momentum")


class _Snapshot:
    """Parameters, buffers, optimizer state and random-number states, to undo the warm-up steps in place
    (``copy_`` into the same tensors: a captured graph keeps their addresses)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.tensors = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]
        self.state = {id(t): t.detach().clone() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, Tensor)}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        for t, saved in self.tensors:
            t.copy_(saved)
        for s in self.optimizer.state.values():
            for t in s.values():
                if not isinstance(t, Tensor):
                    continue
                saved = self.state.get(id(t))
                if saved is None:
                    t.zero_()           # created by the warm-up: zero is its initial state (module docstring)
                else:
                    t.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


class GraphedStep:
    """``step(x, y) -> (loss, output)``: one training step of ``model`` with ``optimizer`` on ``loss_fn(model(x),
    y)``, captured as a CUDA graph on the example batch ``(x, y)`` and replayed for each new batch of the same
    shape (module docstring). ``loss`` and ``output`` are static tensors, overwritten by the next step.

    ``autocast``: a dtype to run the forward under ``torch.autocast`` (bf16; fp16 needs a ``GradScaler``, which
    cannot be captured). ``capture=False`` runs the same static-tensor step eagerly (the state handling,
    testable without a GPU; default: capture on CUDA)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
                 autocast: torch.dtype | None = None, warmup: int = 3, capture: bool | None = None):
        self.device = x.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA-graph capture needs CUDA tensors, got the example batch on {self.device}")
        if autocast == torch.float16:
            raise ValueError("fp16 needs a GradScaler, whose inf checks sync with the host: capture bf16 instead")
        _check_model(model)
        self.model, self.optimizer, self.loss_fn, self.autocast = model, optimizer, loss_fn, autocast
        make_capturable(optimizer, self.device)
        self.x, self.y = x.detach().clone(), y.detach().clone()
        self.lrs = [group["lr"] for group in optimizer.param_groups]      # the tensors the graph reads
        self.loss = self.output = None
        self.graph = None
        snapshot = _Snapshot(model, optimizer, self.device)
        self._warm_up(warmup)
        snapshot.restore()
        optimizer.zero_grad(set_to_none=True)
        if self.capture:
            self._capture()

    def _step(self) -> tuple[Tensor, Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None,
                            cache_enabled=False):    # cached casts would outlive the capture: PyTorch's advice
            output = self.model(self.x)
            loss = self.loss_fn(output, self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), output.detach()

    def _warm_up(self, steps: int) -> None:
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self) -> None:
        cpu_rng = torch.get_rng_state()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss, self.output = self._step()
        except RuntimeError as err:
            raise RuntimeError(f"the training step cannot be captured as a CUDA graph (a host sync such as "
                               f".item() inside it?): {str(err).splitlines()[0]}") from err
        if not torch.equal(cpu_rng, torch.get_rng_state()):
            raise RuntimeError("the training step draws random numbers on the host (PyTorch's CPU generator) "
                               "while it is captured: every replay would reuse them (e.g. one dropout mask "
                               "for all steps); draw them on the device")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"a captured step needs the batch shapes it was captured with: input "
                             f"{tuple(self.x.shape)}, target {tuple(self.y.shape)}; got {tuple(x.shape)}, "
                             f"{tuple(y.shape)} (drop the last partial batch)")
        self.x.copy_(x)
        self.y.copy_(y)
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            if group["lr"] is not lr:      # a scheduler (or resume code) assigned a new value instead of filling
                lr.fill_(group["lr"])      # the tensor: carry it into the one the graph reads
                group["lr"] = lr
        if self.graph is not None:
            self.graph.replay()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss, self.output = self._step()
        return self.loss, self.output


def compiled_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Tensor, Tensor], Tensor],
                  *, autocast: torch.dtype | None = None, backend: str = "inductor",
                  mode: str | None = "reduce-overhead") -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``step(x, y) -> (loss, output)`` with ``model`` under ``torch.compile(backend=backend, mode=mode)``: with
    ``"reduce-overhead"`` on CUDA, inductor replays the compiled forward and backward as CUDA graphs; the
    optimizer step runs eagerly (fused SGD / capturable Adam: a few multi-tensor kernels). Outputs of a replay
    are overwritten by the next step, as with :class:`GraphedStep`."""
    device = next(model.parameters()).device
    if autocast == torch.float16:
        raise ValueError("fp16 needs a GradScaler, whose inf checks sync with the host: use bf16")
    make_capturable(optimizer, device)
    compiled = torch.compile(model, backend=backend, mode=mode)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        torch.compiler.cudagraph_mark_step_begin()    # the previous step's outputs may now be overwritten
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            output = compiled(x)
            loss = loss_fn(output, y)
        loss.backward()
        optimizer.step()
        return loss.detach(), output.detach()

    return step


def train_step_for(device: torch.device, amp: torch.dtype | None, world: int, compiled: str | None):
    """``effdense-train --cuda-graphs``: a drop-in for :func:`effdense.train.step.train_step` (same arguments, same
    detached ``(loss, logits)``) that captures the step on its first batch and replays it for every later one.
    Raises ``ValueError`` saying why where a captured step cannot run."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    if amp == torch.float16:
        raise ValueError("--amp fp16 needs a GradScaler, whose inf checks sync with the host: use --amp bf16")
    if world > 1:
        raise ValueError("not with several processes (DistributedDataParallel's hooks are not captured here)")
    if compiled:
        raise ValueError("not with --compile: use one of the two (torch.compile's mode='reduce-overhead' is the "
                         "compiler's own CUDA-graph path)")
    captured: list[GraphedStep] = []

    def step(model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer, scaler, ctx):
        if not captured:
            captured.append(GraphedStep(model, opt, torch.nn.functional.cross_entropy, x, y, autocast=amp))
        loss, logits = captured[0](x, y)
        return loss.clone(), logits.clone()      # the static ones are overwritten by the next replay

    return step
