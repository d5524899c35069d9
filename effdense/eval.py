"""``effdense-eval``: the test (or validation) accuracy of a checkpoint written by ``effdense-train``.

The checkpoint holds the model's description, so only the file is needed::

    effdense-eval runs/digits-densenet_bc_16_k8/best.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from . import backends, checkpoint_io
from .data import Augment, DataError, load_dataset
from .train import Context, Dist, build_model, evaluate, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effdense-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a last.pt or best.pt written by effdense-train")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-dir", help="dataset folder (default: the training run's)")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--backend", default="auto", choices=backends.names())
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        ckpt = checkpoint_io.load(args.checkpoint, device)
        run = ckpt["args"]
        data = load_dataset(run["dataset"], args.data_dir or run.get("data_dir"), run.get("val_size") or 0,
                            allow_download=False)
    except (DataError, RuntimeError, FileNotFoundError) as err:
        raise SystemExit(f"effdense-eval: {err}") from None
    split = data.val if args.split == "val" else data.test
    if split is None:
        raise SystemExit("effdense-eval: the run had no validation split (--val-size 0)")
    model = build_model(ckpt["model_spec"], args.backend).to(device)
    model.load_state_dict(ckpt["model"])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # the training set's normalization, as saved (the same split gives the same statistics)
    augment = Augment(ckpt["dataset"]["mean"], ckpt["dataset"]["std"])
    ctx = Context(device, Dist(), augment, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                  args.channels_last)
    loss, acc = evaluate(model, split.to(device), ctx, args.batch_size)
    result = {"checkpoint": args.checkpoint, "epoch": ckpt.get("epoch"), "split": args.split, "images": len(split),
              "loss": loss, "accuracy": acc}
    print(json.dumps(result) if args.json else
          f"{args.split} accuracy {acc:.2%} (loss {loss:.4f}) on {len(split)} {run['dataset']} images, "
          f"{args.checkpoint} (epoch {ckpt.get('epoch')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
