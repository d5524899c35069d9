"""The command line of ``effdense-train``: its arguments, the per-dataset presets and the paper's recipe.

:func:`parse_args` completes the arguments (presets where a flag is not given, the paper's CIFAR recipe, the model
chosen by ``--arch`` or built by ``--depth``) and validates them with argparse's one-line errors.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from .. import backends
from ..models import MODELS, cifar_block_config
from .baselines import BASELINES
from .data import DATASETS

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
    # a user's images (data.folder): an ImageNet-stem DenseNet; validation on ROOT/val unless --val-size
    "folder": {"arch": "densenet121", "val_size": 0},
}
#: the arguments of --dataset folder only
FOLDER_KEYS = ("image_size", "mean", "std", "workers", "skip_bad_images")
MODEL_KEYS = ("arch", "depth", "growth_rate")
CUSTOM = "densenet_cifar"
#: the arguments that define a run: ``--resume`` refuses a checkpoint whose run had other values
RUN_KEYS = ("dataset", "val_size", "arch", "depth", "growth_rate", "bottleneck", "compression", "drop_rate", "stem",
            "batch_size", "epochs", "lr", "momentum", "weight_decay", "schedule", "amp", "sync_bn", "seed",
            "image_size", "mean", "std")
#: those ``--allow-change`` may change on resume: the optimizer's hyperparameters and the length of the run (the
#: others change what the history and best.pt mean, or the model itself)
CHANGEABLE = ("epochs", "lr", "momentum", "weight_decay")


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
    f = p.add_argument_group("--dataset folder (ROOT/train/<class>/*.jpg|png|..., ROOT/val/<class>/...; needs "
                             "pip install 'effdense[vision]')")
    f.add_argument("--image-size", type=positive_int, help="training crop and evaluation size (default 224)")
    f.add_argument("--mean", type=float, nargs=3, metavar="M", help="normalization mean (default ImageNet's)")
    f.add_argument("--std", type=positive, nargs=3, metavar="S", help="normalization std (default ImageNet's)")
    f.add_argument("--workers", type=natural, help="DataLoader worker processes per process (default: the CPUs, "
                                                   "shared by the processes, at most 8; 0: load in the process)")
    f.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable or corrupt images (counted in the log) instead of stopping the run")
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
    x.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output-dir that holds another run's files, deleting them first")
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
    _check_folder_args(parser, args)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.dataset}-{model_label(args)}")
    if args.overwrite and args.resume:
        parser.error("--overwrite starts a new run, deleting the old one's files; --resume continues it: give one")
    if args.allow_change and not args.resume:
        parser.error("--allow-change applies to --resume only")
    args.allow_change = [name.replace("-", "_") for name in args.allow_change]  # attribute names, as RUN_KEYS
    return args


def _check_folder_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The folder dataset's arguments are refused with another dataset (they would be silently ignored)."""
    given = [k for k in FOLDER_KEYS if getattr(args, k) not in (None, False)]
    if given and args.dataset != "folder":
        parser.error(f"{', '.join('--' + _flag_name(k) for k in given)} appl{'y' if len(given) > 1 else 'ies'} to "
                     "--dataset folder only")
    if args.dataset == "folder" and not args.data_dir:
        parser.error("--dataset folder needs --data-dir ROOT (ROOT/train/<class>/<image>, ROOT/val/<class>/...)")


def model_label(args: argparse.Namespace) -> str:
    if args.arch != CUSTOM:
        return args.arch
    return f"densenet{'_bc' if args.bottleneck else ''}_{args.depth}_k{args.growth_rate}"
