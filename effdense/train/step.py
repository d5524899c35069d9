"""One training step, evaluation, and the watch on the training loss (no host sync per step)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Augment, Split
from .distributed import Dist

#: the non-finite-loss check reads the losses of this many steps at once: one host sync per check, not per step
CHECK_EVERY = 10

@dataclass
class Context:
    """What a training or evaluation step needs besides the model."""

    device: torch.device
    dist: Dist
    augment: Augment
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def inputs(self, images: Tensor, params: Tensor | None = None) -> Tensor:
        return self.place(self.augment(images, params))

    def place(self, x: Tensor) -> Tensor:
        """A batch of model inputs on the device (asynchronously from pinned memory), channels-last if asked."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(self, split: Split, batch_size: int):
        """``(inputs, labels)`` of ``split`` for evaluation, each process every ``world``-th image: gathered on the
        device, or streamed (a :class:`.data.ImageFiles` split)."""
        if split.streaming:
            for x, y in split.stream(batch_size, self.device, self.dist.world, self.dist.rank):
                yield self.place(x), y.to(self.device, non_blocking=True)
            return
        idx = torch.arange(self.dist.rank, len(split), self.dist.world, device=split.labels.device)
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            yield self.inputs(split.images[b]), split.labels[b]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, ctx: Context, batch_size: int) -> tuple[float, float]:
    """``(mean loss, accuracy)`` on ``split``; each process takes every ``world``-th image, sums are reduced."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for x, y in ctx.batches(split, batch_size):
        with ctx.autocast():
            logits = model(x)
        sums += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(), sums.new_tensor(len(y))])
    model.train(was_training)
    loss, correct, n = ctx.dist.all_reduce(sums).tolist()
    return loss / max(n, 1), correct / max(n, 1)


def train_step(model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, ctx: Context) -> tuple[Tensor, Tensor]:
    """One optimizer step on the batch ``(x, y)``: forward under the run's autocast, cross-entropy, backward (through
    the fp16 gradient scaler if there is one) and the SGD step. Returns the detached loss and logits; the learning
    rate schedule steps outside, after it."""
    with ctx.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss.detach(), logits.detach()


class LossWatch:
    """Notices a non-finite training loss, as Keras' ``TerminateOnNaN`` does, without a host sync per step: the
    losses stay on the device and :meth:`first_bad` reads those since its last call at once (every
    :data:`CHECK_EVERY` steps, and before any checkpoint is written)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device  # of the all-reduce: CUDA under nccl, CPU under gloo, as the run's device
        self.losses: list[Tensor] = []
        self.first_step = 0

    def add(self, loss: Tensor, step: int) -> None:
        if not self.losses:
            self.first_step = step
        self.losses.append(loss)

    def first_bad(self, ctx_dist: Dist) -> tuple[int, float] | None:
        """``(step, loss)`` of the first non-finite loss since the last call on any process, or None; every process
        calls it at the same steps (a collective)."""
        values = torch.stack(self.losses).float().tolist() if self.losses else []
        first, self.losses = self.first_step, []
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))
        if ctx_dist.world > 1:
            t = torch.tensor([bad], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            bad = int(t.item())
        if bad >= len(values):
            return None
        return first + bad, values[bad]


def window_rate(times: Sequence[float], images_per_step: int) -> float | None:
    """Images per second over the steps that ended at ``times[1:]`` (``times[0]``: when the first began): the last
    few steps only, so the progress bar shows the current speed, not an average dragged by the first steps."""
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) * images_per_step / (times[-1] - times[0])


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point entries of a ``state_dict`` holding a nan or inf (one host sync for all)."""
    named = [(k, v) for k, v in state.items() if v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()
    return [k for (k, _), ok in zip(named, finite) if not ok]
