"""``effdense-train``: train a DenseNet (or a baseline CNN) on CIFAR-10/100, digits, Fashion-MNIST or synthetic data.

The defaults are the DenseNet paper's CIFAR recipe (Huang et al., 2017, section 4.2): SGD with Nesterov momentum
0.9, learning rate 0.1 divided by 10 at 50% and 75% of 300 epochs, weight decay 1e-4, batch 64, DenseNet-BC-100
(k=12), 4-pixel pad / random crop / horizontal flip. ``--dataset digits`` has a small preset that trains in a
few minutes on a CPU. Multi-GPU runs go through ``torchrun``; ``--batch-size`` is the total over all processes.

Writes into ``--output-dir``: ``last.pt`` every epoch, ``best.pt`` by validation accuracy (both atomic),
``log.csv``/``log.json`` per epoch, ``curves.png`` (with matplotlib), ``tb/`` (with tensorboard) and
``results.json``. ``--resume`` continues a run exactly where ``last.pt`` left it.
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
    r.add_argument("--sync-bn", action="store_true", help="batch statistics over all processes (torchrun)")
    x = p.add_argument_group("run")
    x.add_argument("--seed", type=natural, default=0)
    x.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    x.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    x.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps (smoke tests)")
    x.add_argument("--output-dir", help="default runs/DATASET-MODEL")
    x.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="continue from OUTPUT_DIR/last.pt, or from CKPT")
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
        kind = "efficient" if backend.memory_efficient else backend.name
        naive = predicted_activation_bytes(model, batch, 32, dtype, "naive")
        mine = predicted_activation_bytes(model, batch, 32, dtype, kind)
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


def setup(args: argparse.Namespace) -> tuple[Dist, torch.device]:
    """Device and process group: ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; gloo on CPU, nccl on
    CUDA."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
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


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.5 * epochs), int(0.75 * epochs)], gamma=0.1)


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

    def __init__(self, out: str, config: dict, enabled: bool) -> None:
        self.out, self.config, self.enabled = out, config, enabled
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
        plot_curves(history, os.path.join(self.out, "curves.png"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(history: list[dict], path: str) -> None:
    """Loss and accuracy against epoch, when matplotlib is importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):  # "val" holds the test split when there is no validation split
            label = history[-1].get("monitor", "val") if split == "val" else split
            ax.plot(epochs, [r[f"{split}_{metric}"] for r in history], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    checkpoint_io.atomic_write(path, lambda f: f.write(buf.getvalue()))


COLUMNS = [("epoch", "{:>5}"), ("lr", "{:>9.2e}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.2%}"),
           ("val_loss", "{:>8.4f}"), ("val_acc", "{:>8.2%}"), ("images_per_s", "{:>8.0f}"), ("seconds", "{:>7.1f}"),
           ("peak_mem_mib", "{:>8.0f}")]


def epoch_table(history: list[dict]) -> str:
    heads = ["epoch", "lr", "train loss", "train acc", "val loss", "val acc", "img/s", "time s", "peak MiB"]
    widths = [len(fmt.format(1)) if key != "lr" else 9 for key, fmt in COLUMNS]
    lines = [" ".join(h.rjust(max(w, len(h))) for h, w in zip(heads, widths))]
    for row in history:
        cells = [("-" if row.get(key) is None else fmt.format(row[key])).rjust(max(w, len(h)))
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


def train(args: argparse.Namespace, command: Sequence[str] | None = None) -> dict:
    """Run the training command; returns the final results (also written to ``results.json``, with the
    environment record of :func:`effdense.info.environment` and ``command``, default ``sys.argv``)."""
    ctx_dist, device = setup(args)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    say = print if ctx_dist.main else (lambda *a, **k: None)

    try:
        data = load_dataset(args.dataset, args.data_dir, args.val_size, allow_download=not args.no_download)
    except ValueError as err:  # e.g. --val-size larger than the training set
        raise SystemExit(f"effdense-train: {err}") from None
    spec = model_spec(args, data.num_classes, data.in_channels)
    model = build_model(spec, args.backend).to(device)
    if ctx_dist.world > 1:
        seed_everything(args.seed + ctx_dist.rank)  # different dropout masks per process, same initial weights
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    backend = block_backend(model, device, amp_dtype or torch.float32)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    world = ctx_dist.world
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is the total over {world} processes and must divide evenly")
    local_batch = args.batch_size // world
    say(f"model {model_label(args)} ({spec['arch']}), dataset {args.dataset}: {len(data.train)} train, "
        f"{len(data.val) if data.val else 0} val, {len(data.test)} test, {data.num_classes} classes; "
        f"device {device}, {world} process(es)")
    if args.sync_bn:
        if world > 1:
            model = convert_sync_bn(model, device, backend)
            backend = block_backend(model, device, amp_dtype or torch.float32)  # "auto" may now pick another
        else:
            say("--sync-bn has no effect in a single process")
    if ctx_dist.main:
        say(summarize(model, data.in_channels, device, local_batch, amp_dtype or torch.float32))

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                          weight_decay=args.weight_decay)
    sched = make_scheduler(opt, args.schedule, args.epochs)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    steps_per_epoch = len(data.train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training images")

    state = {"epoch": 0, "step": 0, "global_step": 0, "best_acc": -1.0, "best_epoch": None, "history": [],
             "meter": [0.0, 0.0, 0.0, 0.0]}
    if args.resume:
        path = os.path.join(args.output_dir, "last.pt") if args.resume == "last" else args.resume
        try:
            ckpt = checkpoint_io.load(path)
        except (FileNotFoundError, RuntimeError) as err:
            raise SystemExit(f"effdense-train: --resume: {err}") from None
        if ckpt.get("model_spec") != spec:
            raise SystemExit(f"{path} holds model {ckpt.get('model_spec')}, but these flags build {spec}; "
                             "resume with the flags of the original run")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state.update({k: ckpt[k] for k in state})
        rng = ckpt["rng"]
        checkpoint_io.set_rng_state(rng[ctx_dist.rank] if ctx_dist.rank < len(rng) else rng[0])
        say(f"resumed from {path}: epoch {state['epoch']}, step {state['step']} of {steps_per_epoch}")

    net = model  # the plain module: saved, evaluated
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model, backend=args.compile)

    if ctx_dist.main:
        os.makedirs(args.output_dir, exist_ok=True)
    config = {k: v for k, v in vars(args).items()} | {"world_size": world, "device": str(device),
                                                       "backend_resolved": backend.name if backend else None}
    env = info.environment(device, command)
    logger = Logger(args.output_dir, config | {"environment": env}, ctx_dist.main)
    for note in logger.notes:
        say(note)
    augment = Augment(data.mean, data.std, pad=4, flip=data.flip)
    ctx = Context(device, ctx_dist, augment, amp_dtype, args.channels_last)
    data = data.to(device)
    monitor = data.val if data.val is not None else data.test
    if data.val is None:
        say("no validation split (--val-size 0): best.pt is chosen by test accuracy")

    def save(path: str, epoch: int, step: int) -> None:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, checkpoint_io.rng_state())
        else:
            rngs = [checkpoint_io.rng_state()]
        if ctx_dist.main:
            checkpoint_io.atomic_save({
                "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "step": step,
                "global_step": state["global_step"], "best_acc": state["best_acc"], "best_epoch": state["best_epoch"],
                "history": state["history"], "meter": state["meter"], "rng": rngs, "model_spec": spec,
                "dataset": {"name": data.name, "classes": data.classes, "mean": data.mean, "std": data.std},
                "args": config}, path)

    from tqdm.auto import tqdm
    stopped = bool(args.max_steps and state["global_step"] >= args.max_steps)
    lo, hi = ctx_dist.rank * local_batch, (ctx_dist.rank + 1) * local_batch
    model.train()
    while state["epoch"] < args.epochs and not stopped:
        epoch = state["epoch"]
        perm = torch.randperm(len(data.train), generator=_generator(args.seed, epoch)).to(device)
        meter = torch.tensor(state["meter"], dtype=torch.float64, device=device)  # loss sum, correct, n, seconds
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(total=steps_per_epoch, initial=state["step"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not ctx_dist.main or args.no_progress, leave=False, dynamic_ncols=True)
        tick = time.perf_counter()
        for step in range(state["step"], steps_per_epoch):
            idx = perm[step * args.batch_size + lo: step * args.batch_size + hi]
            params = augment.draw(args.batch_size, _generator(args.seed, epoch, step))[lo:hi]
            x, y = ctx.inputs(data.train.images[idx], params), data.train.labels[idx]
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
            meter[:3] += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                      meter.new_tensor(len(y))])
            state["global_step"] += 1
            state["step"] = step + 1
            stopped = bool(args.max_steps and state["global_step"] >= args.max_steps)
            if bar.disable is False and (step % 10 == 0 or step + 1 == steps_per_epoch or stopped):
                loss_sum, correct, n = meter[:3].tolist()
                seconds = meter[3].item() + time.perf_counter() - tick
                post = {"loss": f"{loss_sum / n:.4f}", "acc": f"{correct / n:.2%}",
                        "img/s": f"{n * world / seconds:.0f}"}
                if device.type == "cuda":
                    post["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}MiB"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
            if stopped:
                break
        bar.close()
        meter[3] += time.perf_counter() - tick
        if state["step"] < steps_per_epoch:  # --max-steps ended the run inside an epoch: save where it is
            state["meter"] = meter.tolist()
            save(os.path.join(args.output_dir, "last.pt"), epoch, state["step"])
            say(f"stopped after {state['global_step']} steps (--max-steps), inside epoch {epoch + 1}")
            break
        loss_sum, correct, n, seconds = ctx_dist.all_reduce(meter.clone()).tolist()
        seconds /= world
        if world > 1 and not args.sync_bn:  # evaluate every process with process 0's running statistics
            for buf in net.buffers():
                dist.broadcast(buf, 0)
        val_loss, val_acc = evaluate(net, monitor, ctx, args.eval_batch_size)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / n,
               "train_acc": correct / n, "val_loss": val_loss, "val_acc": val_acc, "images_per_s": n / seconds,
               "seconds": seconds,
               "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
               "monitor": "val" if data.val is not None else "test"}
        sched.step()
        state["history"].append(row)
        state.update(epoch=epoch + 1, step=0, meter=[0.0, 0.0, 0.0, 0.0])
        improved = val_acc > state["best_acc"]
        if improved:
            state["best_acc"], state["best_epoch"] = val_acc, epoch + 1
        logger.epoch(state["history"])
        save(os.path.join(args.output_dir, "last.pt"), epoch + 1, 0)
        if improved:
            save(os.path.join(args.output_dir, "best.pt"), epoch + 1, 0)
        msg = (f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}, "
               f"{row['monitor']} loss {val_loss:.4f} acc {val_acc:.2%}, {row['images_per_s']:.0f} img/s"
               + (f", peak {row['peak_mem_mib']:.0f} MiB" if row["peak_mem_mib"] is not None else ""))
        if ctx_dist.main:
            tqdm.write(msg)

    if world > 1:
        check_replicas(net, ctx_dist, say)
    results = {"dataset": args.dataset, "model": model_label(args), "epochs_done": state["epoch"],
               "global_step": state["global_step"]}
    results["test_loss"], results["test_acc"] = evaluate(net, data.test, ctx, args.eval_batch_size)
    best_path = os.path.join(args.output_dir, "best.pt")
    if state["best_epoch"] is not None and state["best_epoch"] != state["epoch"] and data.val is not None:
        if world > 1:
            dist.barrier()
        best = copy.deepcopy(net)
        best.load_state_dict(checkpoint_io.load(best_path, device)["model"])
        results["best_epoch"], results["best_val_acc"] = state["best_epoch"], state["best_acc"]
        results["best_test_loss"], results["best_test_acc"] = evaluate(best, data.test, ctx, args.eval_batch_size)
    elif state["best_epoch"] is not None:
        results["best_epoch"], results["best_val_acc"] = state["best_epoch"], state["best_acc"]
        results["best_test_acc"] = results["test_acc"] if data.val is not None else None
    logger.close()
    if ctx_dist.main:
        if state["history"]:
            say(epoch_table(state["history"]))
        results["environment"] = env
        checkpoint_io.atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=1))
        line = f"test accuracy: {results['test_acc']:.2%} (last weights"
        if results.get("best_test_acc") is not None:
            line += f"; best.pt from epoch {results['best_epoch']}: {results['best_test_acc']:.2%}"
        say(line + f"); outputs in {args.output_dir}")
    return results


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
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        train(args, ["effdense-train", *(sys.argv[1:] if argv is None else argv)])
    except (DataError, NotImplementedError) as err:
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
