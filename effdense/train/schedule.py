"""Seeds and the learning-rate schedule: both functions of where the run is (seed, epoch, step), not of how it got
there, so a resumed run draws the same batches and learning rates bit for bit."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys`` (seed, epoch, step): data order and augmentation are a function of
    where the run is, not of how it got there, so a resumed run draws the same batches."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + k + 1) % 2**63
    return torch.Generator().manual_seed(seed)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``, over the initial one: ``step`` divides
    by 10 at 50% and at 75% of the steps, ``cosine`` is ``(1 + cos(pi * step / total)) / 2``. Per step, not per
    epoch, so a 1- or 2-epoch run has the recipe's shape too; a pure function of the step, so a resumed run gets
    the same learning rates bit for bit."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    return 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to step after every optimizer step. Its factor is a closure, which ``LambdaLR`` does not save: a
    resumed run's schedule comes from its own arguments (``--allow-change epochs`` recomputes it)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(schedule, step, total_steps))


def schedule_points(schedule: str, total: int) -> str:
    if schedule == "cosine":
        return f"cosine annealing over {total} steps"
    return f"lr/10 at steps {total // 2 + 1} and {3 * total // 4 + 1} of {total}"
