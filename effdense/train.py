"""``effdense-train``: train a DenseNet (or a baseline CNN) on CIFAR-10/100, digits, Fashion-MNIST or synthetic data.

The defaults are the DenseNet paper's CIFAR recipe (Huang et al., 2017, section 4.2): SGD with Nesterov momentum
0.9, learning rate 0.1 divided by 10 at 50% and 75% of 300 epochs, weight decay 1e-4, batch 64, DenseNet-BC-100
(k=12), 4-pixel pad / random crop / horizontal flip. ``--dataset digits`` has a small preset that trains in a
few minutes on a CPU. Multi-GPU runs go through ``torchrun``; ``--batch-size`` is the total over all processes.

Writes into ``--output-dir``: ``last.pt`` every epoch (and every ``--save-every`` steps), ``best.pt`` by
validation accuracy (both atomic), ``log.csv``/``log.json`` per epoch, ``curves.png`` (with matplotlib), ``tb/``
(with tensorboard) and ``results.json``. ``--resume`` continues a run exactly where ``last.pt`` left it, and refuses
a checkpoint of a run with other arguments unless the change is named (``--allow-change epochs``). The learning
rate follows its schedule per optimizer step, so a 1-epoch run has the recipe's shape too. A non-finite loss stops
the run; weights or running statistics that are not finite are never saved.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, checkpoint_io, info
from .backends import bn
from .baselines import BASELINES
from .data import DATASETS, Augment, DataError, Split, load_dataset
from .memory import predicted_activation_bytes
from .models import MODELS, EfficientDenseNet, cifar_block_config, densenet_cifar

#: the paper's CIFAR recipe
PAPER = {"epochs": 300, "batch_size": 64, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step"}
#: per-dataset defaults, applied where a flag is not given (model keys only without --arch/--depth)
PRESETS: dict[str, dict] = {
    "cifar10": {"arch": "densenet_bc_100_k12", "val_size": 5000},
    "cifar100": {"arch": "densenet_bc_100_k12", "val_size": 5000},
    "fashion-mnist": {"arch": "densenet_bc_100_k12", "val_size": 5000, "epochs": 30},
    # a CPU-sized run: DenseNet-BC-16 (k=8), batch 32, cosine schedule, 15 epochs
    "digits": {"depth": 16, "growth_rate": 8, "epochs": 15, "batch_size": 32, "schedule": "cosine", "val_size": 200},
    "synthetic": {"depth": 10, "growth_rate": 4, "epochs": 2, "val_size": 64},
}
MODEL_KEYS = ("arch", "depth", "growth_rate")
CUSTOM = "densenet_cifar"
#: the arguments that define a run: ``--resume`` refuses a checkpoint whose run had other values
RUN_KEYS = ("dataset", "val_size", "arch", "depth", "growth_rate", "bottleneck", "compression", "drop_rate", "stem",
            "batch_size", "epochs", "lr", "momentum", "weight_decay", "schedule", "amp", "sync_bn", "seed")
#: those ``--allow-change`` may change on resume: the optimizer's hyperparameters and the length of the run (the
#: others change what the history and best.pt mean, or the model itself)
CHANGEABLE = ("epochs", "lr", "momentum", "weight_decay")
#: files a run writes into --output-dir (through atomic temporary files)
RUN_FILES = ("last.pt", "best.pt", "log.csv", "log.json", "results.json", "curves.png")
#: the non-finite-loss check reads the losses of this many steps at once: one host sync per check, not per step
CHECK_EVERY = 10


# ---------------------------------------------------------------------------------------------- arguments

def _number(kind: type, low: float, low_open: bool, high: float | None = None, high_open: bool = False):
    """An argparse ``type`` accepting ``kind`` values in the interval, with an error naming it."""
    lo, hi = "(" if low_open else "[", ")" if high_open or high is None else "]"
    interval = f"{lo}{low}, {'inf' if high is None else high}{hi}"
    if high is None:
        interval = f"{'>' if low_open else '>='} {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f"{interval}, got {text!r}") from None
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)) and math.isfinite(value)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {'' if high is None else 'in '}{interval}, got {text}")
        return value
    return parse


positive_int, natural, positive = _number(int, 0, True), _number(int, 0, False), _number(float, 0, True)
natural_float = _number(float, 0, False)


def _flag_name(key: str) -> str:
    """An argument's attribute name as its flag spells it: ``weight_decay`` -> ``weight-decay``."""
    return key.replace("_", "-")


def compile_backend(text: str) -> str:
    """A ``torch.compile`` backend name that dynamo knows."""
    import torch._dynamo
    known = torch._dynamo.list_backends(exclude_tags=())
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {text!r}; known: {', '.join(known)}")
    return text


def model_names() -> list[str]:
    return [*MODELS, *BASELINES]


def list_models() -> str:
    lines = ["DenseNets (any --backend):"]
    lines += [f"  {name:22s} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in MODELS.items()]
    lines.append(f"  {'--depth D --growth-rate K'} a CIFAR DenseNet of any depth (--bottleneck/--no-bottleneck, "
                 "--compression, --drop-rate)")
    lines.append("Baselines, adapted to 32x32 inputs:")
    lines += [f"  {name:22s} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in BASELINES.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effdense-train", description=__doc__.split("\n\n")[0].replace("``", ""),
                                epilog="Defaults marked 'preset' depend on --dataset (cifar: DenseNet-BC-100 k=12, "
                                       "300 epochs, --val-size 5000; digits: a small DenseNet for a CPU).")
    m = p.add_argument_group("model")
    m.add_argument("--arch", help="model name (see --list-models); default: preset")
    m.add_argument("--list-models", action="store_true", help="list model names and exit")
    m.add_argument("--depth", type=positive_int, help="build a CIFAR DenseNet of this depth (3N+4 plain, 6N+4 BC)")
    m.add_argument("--growth-rate", type=positive_int, help="k (default 12 with --depth)")
    m.add_argument("--bottleneck", action=argparse.BooleanOptionalAction, default=None,
                   help="bottleneck layers (DenseNet-B/BC; default) or plain layers")
    m.add_argument("--compression", type=_number(float, 0, True, 1.0),
                   help="transition compression theta (default 0.5 with bottlenecks, 1 without)")
    m.add_argument("--drop-rate", type=_number(float, 0, False, 1.0, True), help="dropout after each dense layer")
    m.add_argument("--stem", choices=("imagenet", "cifar"), help="stem of a named DenseNet (default: its own)")
    m.add_argument("--backend", default="auto", choices=backends.names(), help="dense-block implementation")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="cifar10", choices=DATASETS)
    d.add_argument("--data-dir", help="folder with the dataset files (CIFAR: downloaded there if missing; default "
                                      "$EFFDENSE_DATA or ~/.cache/effdense/datasets)")
    d.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    d.add_argument("--val-size", type=natural, help="training images held out for validation (default: preset)")
    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=positive_int, help=f"default {PAPER['epochs']} (or preset)")
    r.add_argument("--batch-size", type=positive_int, help=f"total over all processes (default {PAPER['batch_size']})")
    r.add_argument("--lr", type=positive, help=f"initial learning rate (default {PAPER['lr']})")
    r.add_argument("--momentum", type=_number(float, 0, False, 1.0, True), default=PAPER["momentum"])
    r.add_argument("--weight-decay", type=natural_float, default=PAPER["weight_decay"])
    r.add_argument("--schedule", choices=("step", "cosine"),
                   help="step (default): lr/10 at 50%% and 75%% of the epochs; cosine: cosine annealing to 0")
    r.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16 uses a gradient scaler)")
    r.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    r.add_argument("--compile", nargs="?", const="inductor", default=None, type=compile_backend, metavar="BACKEND",
                   help="torch.compile the model (default backend inductor; e.g. aot_eager to check tracing)")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step as a CUDA graph and replay it (effdense.cuda_graphs)")
    r.add_argument("--sync-bn", action="store_true", help="batch statistics over all processes (torchrun)")
    x = p.add_argument_group("run")
    x.add_argument("--seed", type=natural, default=0)
    x.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    x.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    x.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps (smoke tests)")
    x.add_argument("--output-dir", help="default runs/DATASET-MODEL")
    x.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="continue from OUTPUT_DIR/last.pt, or from CKPT; refused if the run's arguments differ")
    x.add_argument("--allow-change", nargs="+", action="extend", choices=[_flag_name(k) for k in CHANGEABLE],
                   default=[], metavar="ARG", help="with --resume: accept a new value of these arguments ("
                   + ", ".join(_flag_name(k) for k in CHANGEABLE) + "); the schedule is then recomputed, as printed")
    x.add_argument("--save-every", type=positive_int, metavar="N",
                   help="also save last.pt every N optimizer steps inside an epoch (resume from there is exact)")
    x.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for intra-op parallelism (torch.set_num_threads; on a busy machine 1 is often "
                        "fastest)")
    x.add_argument("--eval-batch-size", type=positive_int, default=256)
    x.add_argument("--no-progress", action="store_true", help="no tqdm bars (one line per epoch instead)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and complete the arguments: presets, the paper's recipe, and validation with argparse errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        return args
    preset = PRESETS[args.dataset]
    if args.arch is not None and args.depth is not None:
        parser.error("give either --arch NAME or --depth D (a custom CIFAR DenseNet), not both")
    if args.arch is None and args.depth is None:
        args.arch, args.depth = preset.get("arch"), preset.get("depth")
        if args.growth_rate is None:
            args.growth_rate = preset.get("growth_rate")
    for key, value in {**PAPER, **preset}.items():
        if key not in MODEL_KEYS and getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.depth is not None:
        args.arch = CUSTOM
        args.growth_rate = args.growth_rate or 12
        args.bottleneck = True if args.bottleneck is None else args.bottleneck
        try:
            cifar_block_config(args.depth, args.bottleneck)
        except ValueError as err:
            parser.error(f"argument --depth: {err}")
    elif args.arch not in model_names():
        parser.error(f"unknown model {args.arch!r}; valid models: {', '.join(model_names())} "
                     "(or --depth D --growth-rate K; see --list-models)")
    else:
        custom_only = [f for f in ("growth_rate", "bottleneck") if getattr(args, f) is not None]
        if args.arch in BASELINES:
            custom_only += [f for f in ("compression", "drop_rate", "stem") if getattr(args, f) is not None]
        if custom_only:
            flags = ", ".join("--" + f.replace("_", "-") for f in custom_only)
            parser.error(f"{flags} do not apply to --arch {args.arch}; they shape a custom DenseNet built with --depth")
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.dataset}-{model_label(args)}")
    if args.allow_change and not args.resume:
        parser.error("--allow-change applies to --resume only")
    args.allow_change = [name.replace("-", "_") for name in args.allow_change]  # attribute names, as RUN_KEYS
    return args


def model_label(args: argparse.Namespace) -> str:
    if args.arch != CUSTOM:
        return args.arch
    return f"densenet{'_bc' if args.bottleneck else ''}_{args.depth}_k{args.growth_rate}"


# ---------------------------------------------------------------------------------------------- model

def model_spec(args: argparse.Namespace, num_classes: int, in_channels: int) -> dict:
    """What :func:`build_model` needs, saved in every checkpoint so ``effdense-eval`` can rebuild the model."""
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if args.arch == CUSTOM:
        kwargs.update(depth=args.depth, growth_rate=args.growth_rate, bottleneck=args.bottleneck)
    for key in ("compression", "drop_rate", "stem"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    return {"arch": args.arch, "kwargs": kwargs}


def build_model(spec: dict, backend: str = "auto") -> nn.Module:
    arch, kwargs = spec["arch"], dict(spec["kwargs"])
    if arch in BASELINES:
        return BASELINES[arch](**kwargs)
    if arch == CUSTOM:
        return densenet_cifar(backend=backend, **kwargs)
    return MODELS[arch](backend=backend, **kwargs)


def block_backend(model: nn.Module, device: torch.device, dtype: torch.dtype) -> backends.Backend | None:
    """The backend the dense blocks run with, or None for a baseline."""
    if not isinstance(model, EfficientDenseNet):
        return None
    return backends.resolve(model.blocks()[0].backend, device, dtype)


def summarize(model: nn.Module, in_channels: int, device: torch.device, batch: int, dtype: torch.dtype) -> str:
    """Parameters, forward FLOPs per 32x32 image (``FlopCounterMode``: 2 per multiply-add) and, for a DenseNet,
    the predicted dense-block activation memory of its backend against ``naive`` at ``batch`` images."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    model_backend = model.blocks()[0].backend if isinstance(model, EfficientDenseNet) else None
    was_training = model.training
    backend = block_backend(model, device, dtype)
    if backend is not None:  # kernel backends are opaque to the FLOP counter; naive computes the same convolutions
        model.set_backend("naive")
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, 32, 32, device=device))
    finally:
        model.train(was_training)
        if backend is not None:
            model.set_backend(model_backend)
    lines = [f"parameters: {params:,}", f"FLOPs per image (forward, 32x32): {counter.get_total_flops() / 1e6:.1f} M"]
    if backend is not None:
        kind = "fused" if backend.name == "cpp" else "efficient" if backend.memory_efficient else backend.name
        naive = predicted_activation_bytes(model, batch, 32, dtype, "naive")
        mine = predicted_activation_bytes(model, batch, 32, dtype, kind, device)
        lines.append(f"dense-block activation memory at batch {batch} (predicted): {mine / 2**20:.1f} MiB with "
                     f"backend {backend.name!r}, {naive / 2**20:.1f} MiB naive ({naive / max(mine, 1):.1f}x)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def parse_device(name: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu), with a one-line ``ValueError`` for a name torch does not
    know, a device type effdense does not run on, or a CUDA device this machine lacks."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: effdense runs on cpu and cuda devices, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def setup(args: argparse.Namespace) -> tuple[Dist, torch.device]:
    """Device and process group: ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; gloo on CPU, nccl on
    CUDA."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        device = parse_device(args.device)
    except ValueError as err:
        raise SystemExit(f"effdense-train: {err}") from None
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world), device


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are over all processes, on any device (``nn.SyncBatchNorm``
    runs only on GPUs). Differentiable all-reduces of the per-channel sums, then of the squared deviations from the
    global mean (a two-pass variance, no cancellation); the backward all-reduces the matching gradients."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), xf.new_tensor([x.numel() // x.shape[1]])])
        total = all_reduce(local)
        n, mean = total[-1], total[:-1] / total[-1]
        centered = xf - mean.view(1, -1, 1, 1)
        var = all_reduce((centered * centered).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), factor)
        y = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module, device: torch.device, backend: backends.Backend | None) -> nn.Module:
    """Make every batch norm compute its statistics over all processes: the BN modules (stem, transitions,
    ``norm5``, and the dense layers of ``naive``/``checkpoint``) become synchronized ones, and the memory-efficient
    blocks' shared statistics span the process group (:func:`effdense.backends.bn.enable_sync_stats`)."""
    if backend is not None:
        bn.enable_sync_stats()
        try:   # "auto" now resolves to a backend with cross-process statistics; a named one may have none
            backends.resolve(model.blocks()[0].backend, device, torch.float32)
        except RuntimeError as err:
            bn.disable_sync_stats()
            raise NotImplementedError(f"--sync-bn: {err}") from None
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return model


# ---------------------------------------------------------------------------------------------- training

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
        x = self.augment(images, params)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, ctx: Context, batch_size: int) -> tuple[float, float]:
    """``(mean loss, accuracy)`` on ``split``; each process takes every ``world``-th image, sums are reduced."""
    was_training = model.training
    model.eval()
    idx = torch.arange(ctx.dist.rank, len(split), ctx.dist.world, device=split.labels.device)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        y = split.labels[b]
        with ctx.autocast():
            logits = model(ctx.inputs(split.images[b]))
        sums += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                             (logits.argmax(1) == y).sum().double(), sums.new_tensor(len(b))])
    model.train(was_training)
    loss, correct, n = ctx.dist.all_reduce(sums).tolist()
    return loss / max(n, 1), correct / max(n, 1)


class Logger:
    """Per-epoch CSV, JSON, PNG curves and TensorBoard in the output folder (process 0 only)."""

    def __init__(self, out: str, config: dict, enabled: bool, title: str = "") -> None:
        self.out, self.config, self.enabled, self.title = out, config, enabled, title
        self.tb = None
        self.notes: list[str] = []
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except ImportError:
            self.notes.append("TensorBoard logging off (pip install 'effdense[tensorboard]')")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.notes.append("no curves.png (pip install 'effdense[plots]')")

    def epoch(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        checkpoint_io.atomic_write_text(os.path.join(self.out, "log.csv"), buf.getvalue())
        checkpoint_io.atomic_write_text(os.path.join(self.out, "log.json"),
                                        json.dumps({"config": self.config, "epochs": history}, indent=1))
        if self.tb is not None:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()
        plot_curves(history, os.path.join(self.out, "curves.png"), self.title)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def curve_series(history: list[dict]) -> dict[str, dict[str, list[float]]]:
    """What curves.png plots: per axis label, per split, one value per epoch; accuracy in percent, as printed.
    The second split is the test split when the run had no validation split."""
    monitor = history[-1].get("monitor", "val")
    return {ylabel: {split if split == "train" else monitor: [r[f"{split}_{metric}"] * scale for r in history]
                     for split in ("train", "val")}
            for ylabel, metric, scale in (("cross-entropy loss", "loss", 1.0), ("accuracy (%)", "acc", 100.0))}


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    """Loss and accuracy (in percent, as the console prints it) against epoch, when matplotlib is importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (ylabel, series) in zip(axes, curve_series(history).items()):
        for label, values in series.items():
            ax.plot(epochs, values, marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    checkpoint_io.atomic_write(path, lambda f: f.write(buf.getvalue()))


COLUMNS = [("epoch", "{:>5}"), ("lr", "{:>9.2e}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.2%}"),
           ("val_loss", "{:>8.4f}"), ("val_acc", "{:>8.2%}"), ("images_per_s", "{:>8.0f}"), ("seconds", "{:>7.1f}"),
           ("peak_mem_mib", "{:>8.0f}")]


def number(value: float, decimals: int = 4) -> str:
    """A loss for people: fixed point while that is short, else scientific (a diverging run's loss of 1e34 is
    not printed as 35 digits); nan and inf as such."""
    return f"{value:.{decimals}f}" if abs(value) < 1e4 else f"{value:.3e}"


def _cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_loss"):
        return number(value)
    return fmt.format(value)


def epoch_table(history: list[dict]) -> str:
    heads = ["epoch", "lr", "train loss", "train acc", "val loss", "val acc", "img/s", "time s", "peak MiB"]
    widths = [len(fmt.format(1)) if key != "lr" else 9 for key, fmt in COLUMNS]
    lines = [" ".join(h.rjust(max(w, len(h))) for h, w in zip(heads, widths))]
    for row in history:
        cells = [_cell(key, fmt, row.get(key)).rjust(max(w, len(h)))
                 for (key, fmt), h, w in zip(COLUMNS, heads, widths)]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def oom_message(args: argparse.Namespace) -> str:
    """What to do after CUDA ran out of memory; checkpoints are only ever replaced whole, so last.pt is intact."""
    last = os.path.join(args.output_dir, "last.pt")
    hint = " or a memory-efficient backend (--backend auto, torch, cpp or triton: memory linear in depth " \
        "instead of quadratic)" if args.arch not in BASELINES and args.backend in ("naive", "checkpoint") else ""
    state = (f"{last} is intact; continue with --resume" if os.path.exists(last)
             else "no checkpoint had been written yet")
    return (f"CUDA out of memory training {model_label(args)} at --batch-size {args.batch_size} with --backend "
            f"{args.backend}. Try a smaller --batch-size{hint}, or --amp bf16. {state}.")


# ---------------------------------------------------------------------------------------------- resume

class NonFiniteError(RuntimeError):
    """A non-finite loss, weights or running statistics: the run stops, the message names the step and what was kept."""


def resume_path(args: argparse.Namespace) -> str:
    return os.path.join(args.output_dir, "last.pt") if args.resume == "last" else args.resume


def load_for_resume(args: argparse.Namespace) -> tuple[str, dict]:
    """The checkpoint ``--resume`` names, read before the dataset (a missing checkpoint is no reason to download)."""
    path = resume_path(args)
    if not os.path.isfile(path):
        what = (f"there is no {path} (no run has saved into --output-dir {args.output_dir})"
                if args.resume == "last" else f"checkpoint {path} does not exist")
        raise SystemExit(f"effdense-train: --resume: {what}; start the run without --resume, or name a checkpoint "
                         "with --resume PATH")
    try:
        ckpt = checkpoint_io.load(path)
    except (FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"effdense-train: --resume: {err}") from None
    if "lr_lambdas" not in (ckpt.get("scheduler") or {}):
        raise SystemExit(f"effdense-train: --resume: {path} was written by an older effdense-train, whose learning "
                         "rate changed per epoch; it cannot be resumed exactly with the per-step schedule")
    return path, ckpt


def _flag(key: str) -> str:
    return "--bottleneck/--no-bottleneck" if key == "bottleneck" else "--" + _flag_name(key)


def resume_differences(saved: dict, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(refused, accepted)``: one line for each of :data:`RUN_KEYS` whose value differs from the checkpoint's run;
    accepted are those named by ``--allow-change``."""
    refused, accepted = [], []
    for key in RUN_KEYS:
        if key not in saved or saved[key] == getattr(args, key):
            continue
        line = f"{_flag(key)}: {saved[key]!r} in the checkpoint, {getattr(args, key)!r} now"
        if key in args.allow_change:
            accepted.append(line)
        else:
            refused.append(line + (f" (accept it with --allow-change {_flag_name(key)})" if key in CHANGEABLE
                                   else " (fixed for a run)"))
    return refused, accepted


def check_resume(path: str, ckpt: dict, args: argparse.Namespace) -> None:
    """Refuse to resume a checkpoint of a run with other arguments, listing each difference on its own line."""
    refused, _ = resume_differences(ckpt.get("args") or {}, args)
    if refused:
        raise SystemExit(f"effdense-train: --resume: {path} is a checkpoint of another run; these arguments "
                         "differ:\n  " + "\n  ".join(refused) + "\nResume with the checkpoint's values, or start a "
                         "new run in another --output-dir.")
    if args.epochs < ckpt["epoch"]:
        raise SystemExit(f"effdense-train: --resume: --epochs {args.epochs} is fewer than the {ckpt['epoch']} epochs "
                         f"{path} has already trained")


def spec_difference(saved: dict | None, spec: dict) -> str:
    """One line: how the model a checkpoint holds differs from the one these flags build."""
    if not saved or saved.get("arch") != spec["arch"]:
        return f"model {(saved or {}).get('arch')!r} in the checkpoint, {spec['arch']!r} now"
    old, new = saved.get("kwargs", {}), spec["kwargs"]
    return ", ".join(f"{k} {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
                     for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))


# ---------------------------------------------------------------------------------------------- the step

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


# ---------------------------------------------------------------------------------------------- the run

class Run:
    """One training run: built from the arguments and the checkpoint ``--resume`` names (:meth:`__init__`), then
    stepped an epoch at a time (:meth:`run_epoch`) and finished (:meth:`finish`)."""

    def __init__(self, args: argparse.Namespace, command: Sequence[str] | None = None) -> None:
        self.args = args
        self.dist, self.device = setup(args)
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(args.seed)
        self.say = print if self.dist.main else (lambda *a, **k: None)
        resume = load_for_resume(args) if args.resume else None  # before the data: no download for a missing file
        if resume is not None:
            check_resume(*resume, args)
        self._build_model()
        self._build_optimizer()
        self.state = {"epoch": 0, "step": 0, "global_step": 0, "best_acc": -1.0, "best_epoch": None, "history": [],
                      "meter": [0.0, 0.0, 0.0, 0.0]}
        self.saved = "no checkpoint had been written"  # what last.pt holds, for the non-finite message
        if resume is not None:
            self.restore(*resume)
        self.net = self.model  # the plain module: saved, evaluated
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        if args.compile:
            self.model = torch.compile(self.model, backend=args.compile)
        self.train_step = train_step
        if args.cuda_graphs:
            from .cuda_graphs import train_step_for
            try:
                self.train_step = train_step_for(self.device, self.amp_dtype, self.dist.world, args.compile)
            except ValueError as err:
                raise SystemExit(f"effdense-train: --cuda-graphs: {err}") from None
        self._prepare_outputs(command)
        self.watch = LossWatch(self.device)
        self.lr = self.opt.param_groups[0]["lr"]  # of the latest step
        self.stopped = bool(args.max_steps and self.state["global_step"] >= args.max_steps)

    # -- building

    def _build_model(self) -> None:
        """The dataset (on the CPU), the model on the device and the backend its blocks run with."""
        args, device = self.args, self.device
        try:
            data = load_dataset(args.dataset, args.data_dir, args.val_size, allow_download=not args.no_download)
        except ValueError as err:  # e.g. --val-size larger than the training set
            raise SystemExit(f"effdense-train: {err}") from None
        self.spec = model_spec(args, data.num_classes, data.in_channels)
        model = build_model(self.spec, args.backend).to(device)
        if self.dist.world > 1:
            seed_everything(args.seed + self.dist.rank)  # different dropout masks per process, same initial weights
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
        dtype = self.amp_dtype or torch.float32
        try:  # a backend that cannot run here fails now, in one line, not at the first forward
            backend = block_backend(model, device, dtype)
        except RuntimeError as err:
            raise SystemExit(f"effdense-train: --backend {args.backend}: {err}") from None
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        world = self.dist.world
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} is the total over {world} processes and must divide "
                             "evenly")
        self.local_batch = args.batch_size // world
        self.say(f"model {model_label(args)} ({self.spec['arch']}), dataset {args.dataset}: {len(data.train)} train, "
                 f"{len(data.val) if data.val else 0} val, {len(data.test)} test, {data.num_classes} classes; "
                 f"device {device}, {world} process(es)")
        if args.sync_bn:
            if world > 1:
                model = convert_sync_bn(model, device, backend)
                backend = block_backend(model, device, dtype)  # "auto" may now pick another
            else:
                self.say("--sync-bn has no effect in a single process")
        if self.dist.main:
            self.say(summarize(model, data.in_channels, device, self.local_batch, dtype))
        self.steps_per_epoch = len(data.train) // args.batch_size
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images")
        self.model, self.backend, self.data = model, backend, data

    def _build_optimizer(self) -> None:
        args = self.args
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                   nesterov=args.momentum > 0, weight_decay=args.weight_decay)
        self.total_steps = args.epochs * self.steps_per_epoch
        self.sched = make_scheduler(self.opt, args.schedule, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.amp == "fp16" else None

    def restore(self, path: str, ckpt: dict) -> None:
        """Continue from ``ckpt``: weights, optimizer, schedule, counters and random states."""
        if ckpt.get("model_spec") != self.spec:  # e.g. the dataset's classes changed under the same flags
            raise SystemExit(f"effdense-train: --resume: {path} holds another model "
                             f"({spec_difference(ckpt.get('model_spec'), self.spec)}); resume with the flags of the "
                             "original run")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state.update({k: ckpt[k] for k in self.state})
        rng = ckpt["rng"]
        checkpoint_io.set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
        self.saved = f"{path} from step {self.state['global_step']} is kept"
        self.say(f"resumed from {path}: epoch {self.state['epoch']}, step {self.state['step']} of "
                 f"{self.steps_per_epoch}")
        _, accepted = resume_differences(ckpt.get("args") or {}, self.args)
        if accepted:
            self.apply_changes(accepted)

    def apply_changes(self, accepted: list[str]) -> None:
        """The new values ``--allow-change`` accepted: optimizer hyperparameters from the next step, and the
        schedule recomputed over the new length and learning rate (stated, since the learning rate may jump)."""
        args, opt, sched = self.args, self.opt, self.sched
        before = opt.param_groups[0]["lr"]
        for group in opt.param_groups:
            group.update(initial_lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                         weight_decay=args.weight_decay)
        sched.base_lrs = [args.lr] * len(opt.param_groups)
        for group, fn in zip(opt.param_groups, sched.lr_lambdas):
            group["lr"] = args.lr * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        next_step = sched.last_epoch + 1
        self.say("accepted on resume (--allow-change): " + "; ".join(accepted))
        self.say(f"the schedule is now {schedule_points(args.schedule, self.total_steps)} ({args.epochs} epochs) "
                 f"from lr {args.lr:g}: step {next_step} runs at lr {opt.param_groups[0]['lr']:.4g} (the checkpoint's "
                 f"schedule: {before:.4g})")

    def _prepare_outputs(self, command: Sequence[str] | None) -> None:
        args, data = self.args, self.data
        if self.dist.main:
            os.makedirs(args.output_dir, exist_ok=True)
            stale = checkpoint_io.remove_stale_temporaries(args.output_dir, RUN_FILES)
            if stale:
                self.say(f"removed {len(stale)} temporary file(s) a killed run left in {args.output_dir}: "
                         + ", ".join(stale))
        self.config = {k: v for k, v in vars(args).items()} | {
            "world_size": self.dist.world, "device": str(self.device),
            "backend_resolved": self.backend.name if self.backend else None}
        self.env = info.environment(self.device, command)
        title = (f"{args.dataset}: {model_label(args)}" + (f", backend {self.backend.name}" if self.backend else "")
                 + f", batch {args.batch_size}, {args.schedule} schedule")
        self.logger = Logger(args.output_dir, self.config | {"environment": self.env}, self.dist.main, title)
        for note in self.logger.notes:
            self.say(note)
        augment = Augment(data.mean, data.std, pad=4, flip=data.flip)
        self.ctx = Context(self.device, self.dist, augment, self.amp_dtype, args.channels_last)
        self.data = data.to(self.device)
        self.monitor = self.data.val if self.data.val is not None else self.data.test
        if self.data.val is None:
            self.say("no validation split (--val-size 0): best.pt is chosen by test accuracy")

    # -- checkpoints

    def check_finite(self) -> None:
        """Stop (``NonFiniteError``) at the first non-finite loss since the last check, naming its step."""
        bad = self.watch.first_bad(self.dist)
        if bad is None:
            return
        step, value = bad
        epoch, batch = divmod(step - 1, self.steps_per_epoch)
        value = value if not math.isfinite(value) else "not finite on another process"
        raise NonFiniteError(
            f"the training loss is {value} at step {step} (epoch {epoch + 1}, batch {batch + 1} of "
            f"{self.steps_per_epoch}): stopped, and nothing after it was saved; {self.saved}. A smaller --lr "
            f"(now {self.args.lr:g}) may help" + (", or --amp bf16 in place of fp16" if self.args.amp == "fp16"
                                                  else ""))

    def save(self, path: str, epoch: int, step: int) -> None:
        """Write a checkpoint of the run as it is after ``step`` steps of ``epoch``, unless a weight or a running
        statistic is not finite: then stop, keeping the file that is there."""
        self.check_finite()
        names = nonfinite_tensors(self.net.state_dict())
        bad = torch.tensor([len(names)], dtype=torch.float64, device=self.device)
        if self.dist.all_reduce(bad).item():  # every process stops, or none
            raise NonFiniteError(
                f"{len(names) or 'some'} weights or running statistics are not finite after step "
                f"{self.state['global_step']} ({', '.join(names[:3]) or 'on another process'}"
                f"{', ...' if len(names) > 3 else ''}): stopped without saving; {self.saved}")
        world, rngs = self.dist.world, [checkpoint_io.rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, checkpoint_io.rng_state())
        if self.dist.main:
            data, state = self.data, self.state
            checkpoint_io.atomic_save({
                "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": epoch, "step": step, "global_step": state["global_step"], "best_acc": state["best_acc"],
                "best_epoch": state["best_epoch"], "history": state["history"], "meter": state["meter"],
                "rng": rngs, "model_spec": self.spec,
                "dataset": {"name": data.name, "classes": data.classes, "mean": data.mean, "std": data.std},
                "args": self.config}, path)
        if os.path.basename(path) == "last.pt":
            self.saved = f"{path} from step {self.state['global_step']} is kept"

    def save_inside_epoch(self, meter: Tensor, tick: float) -> None:
        """last.pt in the middle of an epoch (``--save-every``, ``--max-steps``): the meter goes with it, so the
        resumed epoch's sums, and everything else, are bit-identical."""
        sums = meter.tolist()
        sums[3] += time.perf_counter() - tick
        self.state["meter"] = sums
        self.save(os.path.join(self.args.output_dir, "last.pt"), self.state["epoch"], self.state["step"])

    # -- the loop

    def run_epoch(self) -> bool:
        """Train the current epoch from where the state is; False when ``--max-steps`` ended the run inside it."""
        from tqdm.auto import tqdm

        args, state, data = self.args, self.state, self.data
        epoch, n_steps = state["epoch"], self.steps_per_epoch
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        perm = torch.randperm(len(data.train), generator=_generator(args.seed, epoch)).to(self.device)
        meter = torch.tensor(state["meter"], dtype=torch.float64, device=self.device)  # loss sum, correct, n, seconds
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=n_steps, initial=state["step"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not self.dist.main or args.no_progress, leave=False, dynamic_ncols=True)
        tick = time.perf_counter()
        times, post = deque([tick], maxlen=CHECK_EVERY + 1), {}
        self.model.train()
        for step in range(state["step"], n_steps):
            idx = perm[step * args.batch_size + lo: step * args.batch_size + hi]
            params = self.ctx.augment.draw(args.batch_size, _generator(args.seed, epoch, step))[lo:hi]
            x, y = self.ctx.inputs(data.train.images[idx], params), data.train.labels[idx]
            lr = self.opt.param_groups[0]["lr"]
            self.lr = lr.clone() if isinstance(lr, Tensor) else lr  # a device tensor with --cuda-graphs: no sync
            loss, logits = self.train_step(self.model, x, y, self.opt, self.scaler, self.ctx)
            self.sched.step()
            meter[:3] += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(),
                                      meter.new_tensor(len(y))])
            state["global_step"] += 1
            state["step"] = step + 1
            self.watch.add(loss, state["global_step"])
            self.stopped = bool(args.max_steps and state["global_step"] >= args.max_steps)
            save_now = (bool(args.save_every and state["global_step"] % args.save_every == 0)
                        and step + 1 < n_steps and not self.stopped)  # the epoch's end and --max-steps save anyway
            if len(self.watch.losses) >= CHECK_EVERY or self.stopped or save_now or step + 1 == n_steps:
                self.check_finite()
            times.append(time.perf_counter())
            if not bar.disable:
                self._progress(bar, post, meter, times, step, n_steps)
            bar.update(1)
            if save_now:
                self.save_inside_epoch(meter, tick)
            if self.stopped:
                break
        bar.close()
        if state["step"] < n_steps:  # --max-steps ended the run inside an epoch: save where it is
            self.save_inside_epoch(meter, tick)
            self.say(f"stopped after {state['global_step']} steps (--max-steps), inside epoch {epoch + 1}")
            return False
        meter[3] += time.perf_counter() - tick
        self.end_epoch(meter)
        return True

    def _progress(self, bar, post: dict, meter: Tensor, times: deque, step: int, n_steps: int) -> None:
        """The bar's numbers: img/s over the last steps every step (host clock, no sync), loss and accuracy every
        :data:`CHECK_EVERY` steps (a host sync)."""
        rate = window_rate(times, self.args.batch_size)
        if rate is not None:
            post["img/s"] = f"{rate:.0f}"
        if step % CHECK_EVERY == 0 or step + 1 == n_steps or self.stopped:
            loss_sum, correct, n = meter[:3].tolist()
            post.update(loss=number(loss_sum / n), acc=f"{correct / n:.2%}")
            if self.device.type == "cuda":
                post["mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**20:.0f}MiB"
        bar.set_postfix(post, refresh=False)

    def end_epoch(self, meter: Tensor) -> None:
        """Validate, log, and write last.pt (and best.pt when validation accuracy improved)."""
        from tqdm.auto import tqdm

        args, state, device = self.args, self.state, self.device
        loss_sum, correct, n, seconds = self.dist.all_reduce(meter.clone()).tolist()
        seconds /= self.dist.world
        if self.dist.world > 1 and not args.sync_bn:  # evaluate every process with process 0's running statistics
            for buf in self.net.buffers():
                dist.broadcast(buf, 0)
        val_loss, val_acc = evaluate(self.net, self.monitor, self.ctx, args.eval_batch_size)
        epoch = state["epoch"]
        row = {"epoch": epoch + 1, "lr": float(self.lr), "train_loss": loss_sum / n, "train_acc": correct / n,
               "val_loss": val_loss, "val_acc": val_acc, "images_per_s": n / seconds, "seconds": seconds,
               "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
               "monitor": "val" if self.data.val is not None else "test"}
        state["history"].append(row)
        state.update(epoch=epoch + 1, step=0, meter=[0.0, 0.0, 0.0, 0.0])
        improved = val_acc > state["best_acc"]
        if improved:
            state["best_acc"], state["best_epoch"] = val_acc, epoch + 1
        self.save(os.path.join(args.output_dir, "last.pt"), epoch + 1, 0)
        if improved:
            self.save(os.path.join(args.output_dir, "best.pt"), epoch + 1, 0)
        self.logger.epoch(state["history"])
        msg = (f"epoch {epoch + 1}/{args.epochs}: train loss {number(row['train_loss'])} acc {row['train_acc']:.2%}, "
               f"{row['monitor']} loss {number(val_loss)} acc {val_acc:.2%}, {row['images_per_s']:.0f} img/s"
               + (f", peak {row['peak_mem_mib']:.0f} MiB" if row["peak_mem_mib"] is not None else ""))
        if self.dist.main:
            tqdm.write(msg)

    def finish(self) -> dict:
        """Test the last weights (and best.pt's), print the epoch table and write results.json."""
        args, state, data, ctx = self.args, self.state, self.data, self.ctx
        if self.dist.world > 1:
            check_replicas(self.net, self.dist, self.say)
        results = {"dataset": args.dataset, "model": model_label(args), "epochs_done": state["epoch"],
                   "global_step": state["global_step"]}
        results["test_loss"], results["test_acc"] = evaluate(self.net, data.test, ctx, args.eval_batch_size)
        best_path = os.path.join(args.output_dir, "best.pt")
        if state["best_epoch"] is not None and state["best_epoch"] != state["epoch"] and data.val is not None:
            if self.dist.world > 1:
                dist.barrier()
            best = copy.deepcopy(self.net)
            best.load_state_dict(checkpoint_io.load(best_path, self.device)["model"])
            results["best_epoch"], results["best_val_acc"] = state["best_epoch"], state["best_acc"]
            results["best_test_loss"], results["best_test_acc"] = evaluate(best, data.test, ctx, args.eval_batch_size)
        elif state["best_epoch"] is not None:
            results["best_epoch"], results["best_val_acc"] = state["best_epoch"], state["best_acc"]
            results["best_test_acc"] = results["test_acc"] if data.val is not None else None
        self.logger.close()
        if self.dist.main:
            if state["history"]:
                self.say(epoch_table(state["history"]))
            results["environment"] = self.env
            checkpoint_io.atomic_write_text(os.path.join(args.output_dir, "results.json"),
                                            json.dumps(results, indent=1))
            line = f"test accuracy: {results['test_acc']:.2%} (last weights"
            if results.get("best_test_acc") is not None:
                line += f"; best.pt from epoch {results['best_epoch']}: {results['best_test_acc']:.2%}"
            self.say(line + f"); outputs in {args.output_dir}")
        return results


def train(args: argparse.Namespace, command: Sequence[str] | None = None) -> dict:
    """Run the training command; returns the final results (also written to ``results.json``, with the
    environment record of :func:`effdense.info.environment` and ``command``, default ``sys.argv``)."""
    run = Run(args, command)
    while run.state["epoch"] < args.epochs and not run.stopped:
        if not run.run_epoch():
            break
    return run.finish()


def check_replicas(model: nn.Module, ctx_dist: Dist, say) -> None:
    """Fail unless every process holds the same parameters (what DDP promises)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not same.item():
        raise RuntimeError("parameters differ between processes after training")
    say(f"parameters identical on all {ctx_dist.world} processes")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_models:
        print(list_models())
        return 0
    try:  # a bad EFFDENSE_BACKEND fails before anything is loaded or downloaded
        backends.env_override()
    except ValueError as err:
        raise SystemExit(f"effdense-train: {err}") from None
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        train(args, ["effdense-train", *(sys.argv[1:] if argv is None else argv)])
        if dist.is_initialized():   # every rank's last collectives done before any tears the group down (a
            dist.barrier()          # gloo worker left holding one has aborted a rank at exit, after a good run)
    except (DataError, NotImplementedError, NonFiniteError) as err:
        raise SystemExit(f"effdense-train: {err}") from None
    except torch.OutOfMemoryError:
        raise SystemExit(f"effdense-train: {oom_message(args)}") from None
    finally:
        bn.disable_sync_stats()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
