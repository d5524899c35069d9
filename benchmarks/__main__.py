"""``python -m benchmarks [--suite NAME ...] [--quick] [--backends ...] [--device DEV] [--out DIR]``"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from . import report
from .common import ALL_BACKENDS, RESULTS, SCHEMA, device_slug, environment
from .suites import SUITES


def write_json_atomic(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_suite(name: str, device: torch.device, quick: bool, backends: list[str], out_dir: str,
              overrides: dict | None = None) -> str:
    env = environment(device)
    config, rows = SUITES[name](device, quick, backends, overrides)
    data = dict(schema=SCHEMA, suite=name, quick=quick, backends=backends, env=env, config=config, rows=rows,
                units=report.UNITS)
    path = os.path.join(out_dir, device_slug(env), f"{name}-{env['timestamp'].replace(':', '')}.json")
    write_json_atomic(path, data)
    print(report.suite_markdown(data))
    print(f"\nwrote {os.path.relpath(path)}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=sorted(SUITES))
    p.add_argument("--quick", action="store_true", help="small sizes, for CPU and CI")
    p.add_argument("--backends", nargs="+", choices=ALL_BACKENDS, default=None,
                   help="default: all (quick: naive, checkpoint, torch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--batch", type=int, help="memory: batch size")
    p.add_argument("--batches", type=int, nargs="+", help="speed: batch sizes")
    p.add_argument("--depths", type=int, nargs="+", help="memory, speed: DenseNet-BC depths")
    p.add_argument("--growth-rates", type=int, nargs="+", help="memory, speed: growth rates")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "fp16"], help="speed: dtypes")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in dict(batch=args.batch, batches=args.batches, depths=args.depths,
                                       growth_rates=args.growth_rates, dtypes=args.dtypes).items() if v is not None}
    backends = args.backends or (["naive", "checkpoint", "torch"] if args.quick else ALL_BACKENDS)
    device = torch.device(args.device)
    for suite in args.suite:
        run_suite(suite, device, args.quick, backends, args.out, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
