"""``python -m benchmarks [--suite NAME ...] [--quick] [--backends ...] [--device DEV] [--out DIR]``

Full runs write into ``benchmarks/results/<device>/`` (tracked; the README's measured section is made from
them). ``--quick`` runs write into a scratch folder (``$TMPDIR/effdense-benchmarks-quick``) unless ``--out``
names one: their batch-2 tables must not replace measured figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is first imported (by effdense, below): without a GPU
    # the `launches` suite counts the triton backend's launches through it. The timing suites leave the
    # interpreter out (a debugging path: see common.backend_unavailable).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import report  # noqa: E402
from .common import ALL_BACKENDS, RESULTS, SCHEMA, device_slug, environment  # noqa: E402
from .suites import SUITES  # noqa: E402
from effdense.train.checkpoints import atomic_write_text  # noqa: E402

#: where ``--quick`` results go unless ``--out`` is given
QUICK_RESULTS = os.path.join(tempfile.gettempdir(), "effdense-benchmarks-quick")


def write_json_atomic(path: str, data: dict) -> None:
    """``path`` holds the old JSON or the new, never half of one; created with the umask's permissions."""
    atomic_write_text(path, json.dumps(data, indent=1))


class Results(list):
    """A suite's rows, the results file rewritten (atomically) after every change: a run stopped by a deadline
    (``timeout`` in benchmarks/gpu_run.sh) leaves the rows it measured, with ``"complete": false``."""

    def __init__(self, path: str, header: dict):
        super().__init__()
        self.path, self.header, self.config = path, header, None

    def write(self, complete: bool = False) -> None:
        write_json_atomic(self.path, dict(self.header, config=self.config, rows=list(self), complete=complete))

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()

    def extend(self, rows) -> None:
        super().extend(rows)
        self.write()

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def run_suite(name: str, device: torch.device, quick: bool, backends: list[str], out_dir: str,
              overrides: dict | None = None) -> str:
    env = environment(device)
    path = os.path.join(out_dir, device_slug(env), f"{name}-{env['timestamp'].replace(':', '')}.json")
    rows = Results(path, dict(schema=SCHEMA, suite=name, quick=quick, backends=backends, env=env,
                              units=report.UNITS))
    rows.write()                      # at once: a run stopped before its first row still says what it was
    config, returned = SUITES[name](device, quick, backends, overrides, rows)
    assert returned is rows, f"suite {name} must append to the rows it is given"
    env["loadavg_end"] = list(os.getloadavg())
    rows.config = config
    rows.write(complete=True)
    with open(path) as f:
        print(report.suite_markdown(json.load(f)))
    print(f"\nwrote {os.path.relpath(path)}")
    return path


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=JSON (e.g. caps_gib=[12]), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{key}: the value must be JSON (e.g. [12], 3, \"bf16\"): {err}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=sorted(SUITES))
    p.add_argument("--quick", action="store_true", help="small sizes, for CPU and CI")
    p.add_argument("--backends", nargs="+", choices=ALL_BACKENDS, default=None,
                   help="default: all (quick: naive, checkpoint, torch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help=f"results folder (default {os.path.relpath(RESULTS)}; with --quick "
                   f"{QUICK_RESULTS})")
    p.add_argument("--batch", type=int, help="memory: batch size")
    p.add_argument("--batches", type=int, nargs="+", help="speed, inference: batch sizes")
    p.add_argument("--depths", type=int, nargs="+", help="memory, speed, inference: DenseNet-BC depths")
    p.add_argument("--growth-rates", type=int, nargs="+", help="memory, speed, inference: growth rates")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "fp16"], help="speed: dtypes")
    p.add_argument("--set", nargs="+", type=_setting, default=[], action="extend", metavar="KEY=JSON",
                   help="any other configuration entry of the chosen suites, e.g. rounds=3 caps_gib=[12] models=[] "
                        "(repeatable; a later value wins)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in dict(batch=args.batch, batches=args.batches, depths=args.depths,
                                       growth_rates=args.growth_rates, dtypes=args.dtypes).items() if v is not None}
    overrides.update(dict(args.set))
    backends = args.backends or (["naive", "checkpoint", "torch"] if args.quick else ALL_BACKENDS)
    device = torch.device(args.device)
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    for suite in args.suite:
        run_suite(suite, device, args.quick, backends, out, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
