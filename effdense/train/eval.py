"""``effdense-eval``: the test (or validation) accuracy of a checkpoint written by ``effdense-train``.

The checkpoint holds the model's description, so only the file (or the run's folder, for its best.pt) is
needed::

    effdense-eval runs/digits-densenet_bc_16_k8/best.pt
    effdense-eval runs/digits-densenet_bc_16_k8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

from .. import backends
from . import checkpoints
from .cli import positive_int
from .data import Augment, DataError, folder_options, load_dataset
from .distributed import Dist, parse_device
from .model import block_backend, build_model
from .step import Context, evaluate

#: what effdense-train writes into every checkpoint besides the weights, and effdense-eval needs
NEEDED = ("args", "model_spec", "dataset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effdense-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a last.pt or best.pt written by effdense-train, or a run's folder (its best.pt)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-dir", help="dataset folder (default: the training run's)")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--backend", default="auto", choices=backends.names())
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def checkpoint_file(path: str) -> str:
    """``path``, or for a run's folder its ``best.pt``."""
    if not os.path.isdir(path):
        return path
    best = os.path.join(path, "best.pt")
    if os.path.isfile(best):
        return best
    found = sorted(f for f in os.listdir(path) if f.endswith(".pt"))
    raise FileNotFoundError(f"{path} is a folder without best.pt" + (f"; it holds {', '.join(found)}: pass one of "
                            "them" if found else "; pass the checkpoint file written by effdense-train"))


def load_checkpoint(path: str, device: torch.device) -> dict:
    """A checkpoint with everything evaluation needs, or a one-line error saying what is missing."""
    ckpt = checkpoints.load(path, device)
    missing = [k for k in NEEDED if k not in ckpt]
    if missing:
        raise RuntimeError(f"{path} is not a checkpoint written by effdense-train: it lacks {', '.join(missing)} "
                           "(a bare state_dict? load it with effdense.densenet121(weights=PATH) or the matching model)")
    return ckpt


def build(ckpt: dict, backend: str, device: torch.device, path: str) -> torch.nn.Module:
    model = build_model(ckpt["model_spec"], backend).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise SystemExit(f"effdense-eval: {path}: its weights do not fit its model "
                         f"({str(err).splitlines()[0].strip()} ...)") from None
    return model


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        backends.env_override()
        device = parse_device(args.device)
        args.checkpoint = checkpoint_file(args.checkpoint)
        ckpt = load_checkpoint(args.checkpoint, device)
        run = ckpt["args"]
        data = load_dataset(run["dataset"], args.data_dir or run.get("data_dir"), run.get("val_size") or 0,
                            allow_download=False, folder=folder_options(run) if run["dataset"] == "folder" else None)
    except (DataError, RuntimeError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"effdense-eval: {err}") from None
    split = data.val if args.split == "val" else data.test
    if split is None:
        raise SystemExit("effdense-eval: the run had no validation split (--val-size 0)")
    model = build(ckpt, args.backend, device, args.checkpoint)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    try:  # a backend that cannot run here: one line now, not a traceback at the first batch
        block_backend(model, device, amp or torch.float32)
    except RuntimeError as err:
        raise SystemExit(f"effdense-eval: --backend {args.backend}: {err}") from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the training set's normalization, as saved (the same split gives the same statistics)
    augment = Augment(ckpt["dataset"]["mean"], ckpt["dataset"]["std"])
    ctx = Context(device, Dist(), augment, amp, args.channels_last)
    loss, acc = evaluate(model, split.to(device), ctx, args.batch_size)
    result = {"checkpoint": args.checkpoint, "epoch": ckpt.get("epoch"), "split": args.split, "images": len(split),
              "loss": loss, "accuracy": acc}
    print(json.dumps(result) if args.json else
          f"{args.split} accuracy {acc:.2%} (loss {loss:.4f}) on {len(split)} {run['dataset']} images, "
          f"{args.checkpoint} (epoch {ckpt.get('epoch')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
