"""Training runs kept as evidence: ``effdense-train`` outputs recorded under ``benchmarks/results/`` and listed in the
README's "Measured" section.

``python -m benchmarks.runs RUN_DIR [--console LOG]`` copies a finished run's ``results.json`` (which holds the
environment record: device, versions, commit, command), ``log.json``, ``log.csv``, ``curves.png`` and, if given,
its console output into ``benchmarks/results/<device>/train-<dataset>-<model>-<time>/``; checkpoints and
TensorBoard files stay behind. :func:`markdown` tabulates every recorded run from those files alone.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile

from .common import RESULTS, device_name, device_slug

FILES = ("results.json", "log.json", "log.csv", "curves.png")


def record(run_dir: str, results: str = RESULTS, console: str | None = None) -> str:
    """Copy the run in ``run_dir`` into ``results``; returns the new folder. The folder appears complete or not
    at all (built beside it, then renamed)."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be the --output-dir of a finished effdense-train run")
    with open(path) as f:
        res = json.load(f)
    env = res.get("environment")
    if not env:
        raise ValueError(f"{path} has no 'environment' record (written by effdense-train from effdense 0.1.0 on)")
    stamp = env["timestamp"].replace(":", "").replace("-", "")
    parent = os.path.join(results, device_slug(env))
    dest = os.path.join(parent, f"train-{res['dataset']}-{res['model']}-{stamp}")
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists: this run is recorded already")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".run-", dir=parent)
    try:
        for name in FILES:
            if os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy2(os.path.join(run_dir, name), tmp)
        if console is not None:
            shutil.copy2(console, os.path.join(tmp, "console.log"))
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def recorded(results: str = RESULTS) -> list[tuple[str, dict, dict]]:
    """``(folder, results.json, log.json)`` of every recorded run, oldest first."""
    runs = []
    for path in glob.glob(os.path.join(results, "*", "train-*", "results.json")):
        folder = os.path.dirname(path)
        with open(path) as f:
            res = json.load(f)
        log_path = os.path.join(folder, "log.json")
        log = {}
        if os.path.isfile(log_path):
            with open(log_path) as f:
                log = json.load(f)
        runs.append((folder, res, log))
    return sorted(runs, key=lambda r: r[1]["environment"]["timestamp"])


def markdown(results: str = RESULTS, link_from: str | None = None) -> str:
    """A table of the recorded runs (empty string without any), curves linked relative to ``link_from``."""
    runs = recorded(results)
    if not runs:
        return ""
    lines = ["| dataset | model | backend | epochs | test acc | img/s (last epoch) | training min | threads | device "
             "| commit | curves |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for i, (folder, res, log) in enumerate(runs, 1):
        env, config = res["environment"], log.get("config", {})
        epochs = log.get("epochs", [])
        speed = f"{epochs[-1]['images_per_s']:.0f}" if epochs else ""
        minutes = f"{sum(e['seconds'] for e in epochs) / 60:.1f}" if epochs else ""   # the epochs, not the test
        png = os.path.join(folder, "curves.png")
        curves = (f"[png]({os.path.relpath(png, link_from)})" if link_from is not None and os.path.isfile(png)
                  else "")
        commit = (env.get("commit") or "unknown")[:10] + (" (dirty)" if env.get("dirty") else "")
        lines.append(f"| {res['dataset']} | {res['model']} | {config.get('backend_resolved', '')} | "
                     f"{res['epochs_done']} | {res['test_acc']:.2%} | {speed} | {minutes} | {env.get('threads', '')} | "
                     f"{device_name(env)} ({env['device_type']}, torch {env['torch']}) | {commit} | {curves} |")
        commands.append(f"{i}. `{env['command']}` ({env['timestamp']})")
    return "\n".join(["#### training runs", "", *lines, "", "Commands:", "", *commands])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runs", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the --output-dir of a finished effdense-train run")
    p.add_argument("--console", default=None, help="the run's console output, kept as console.log")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    try:
        print(record(args.run_dir, args.results, args.console))
    except (OSError, ValueError) as err:
        raise SystemExit(f"python -m benchmarks.runs: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
