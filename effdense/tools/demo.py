"""``python -m effdense.demo``: one training step of DenseNet-BC (k=12) at two depths with every backend that can
run here, printing peak activation memory and step time (CUDA if available, else CPU).

Each model takes a small warm-up step (gradients and optimizer state then exist), a step whose memory is measured
(:func:`effdense.memory.measure_step`; on CPU that goes through the profiler) and a step that is timed without the
profiler, whose overhead would dominate the time on CPU. The profiler's start/stop lines are kept off the console.
Defaults keep the whole demo under a minute on a 2-core CPU (batch 8 there; 64 on CUDA): the memory ratios do not
depend on the batch, the times grow with it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

from .. import backends
from .measure import measure_step, training_step
from ..models import densenet_cifar

DEFAULT_BATCH = {"cpu": 8, "cuda": 64}
#: what the profiler's C++ side prints unasked on every start and stop (torch 2.13)
PROFILER_CHATTER = ("USDT:", "STAGE:")


def runnable(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends that can run a float32 step on ``device``, and why each other one is left out."""
    names, skipped = [], {}
    for name in backends.BACKENDS:
        why = backends.unavailable_reason(name, device, torch.float32)
        if why is None and device.type not in backends.BACKENDS[name].auto_devices:
            why = "runs here only in an interpreter for debugging (minutes per step)"
        if why is None:
            names.append(name)
        else:
            skipped[name] = why
    return names, skipped


@contextlib.contextmanager
def quiet_profiler():
    """Drop the profiler's start/stop lines, which its C++ side writes straight to file descriptor 2; anything
    else written there meanwhile (a warning, an error) is passed on afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(PROFILER_CHATTER)]
            sys.stderr.write("".join(kept))


def measure(depth: int, backend: str, batch: int, device: torch.device) -> dict:
    """Peak memory (one profiled step) and time (one step without the profiler) of a training step."""
    torch.manual_seed(0)
    model = densenet_cifar(depth=depth, growth_rate=12, backend=backend).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    training_step(model, x[:2], y[:2], opt)()  # gradients and optimizer state now exist
    step = training_step(model, x, y, opt)
    with quiet_profiler():
        mem = measure_step(step, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return dict(depth=depth, backend=backend, peak_mib=mem.peak_mib, seconds=time.perf_counter() - start)


def run(depths=(100, 196), batch: int | None = None, names: list[str] | None = None,
        device: str | None = None) -> list[dict]:
    """One row per depth and backend (default: every backend that can run on ``device``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or DEFAULT_BATCH.get(device.type, 8)
    names = names or runnable(device)[0]
    return [measure(depth, backend, batch, device) for depth in depths for backend in names]


def table(rows: list[dict]) -> str:
    lines = [f"{'depth':>5}  {'backend':<11}{'peak MiB':>10}{'vs naive':>10}{'step ms':>9}"]
    for r in rows:
        naive = next((q for q in rows if q["depth"] == r["depth"] and q["backend"] == "naive"), None)
        ratio = f"{r['peak_mib'] / naive['peak_mib']:>10.2f}" if naive else f"{'-':>10}"
        ms = r["seconds"] * 1e3
        lines.append(f"{r['depth']:>5}  {r['backend']:<11}{r['peak_mib']:>10.1f}{ratio}{ms:>9.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--depths", type=int, nargs="+", default=[100, 196])
    p.add_argument("--batch-size", type=int, help=f"default {DEFAULT_BATCH['cpu']} on CPU, "
                                                  f"{DEFAULT_BATCH['cuda']} on CUDA")
    p.add_argument("--backends", nargs="+", choices=list(backends.BACKENDS), help="default: every one that can run")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch_size or DEFAULT_BATCH.get(device.type, 8)
    names, skipped = runnable(device)
    for name in args.backends or []:
        if name in skipped:
            p.error(f"backend {name!r} cannot run on {device}: {skipped[name]}")
    names = args.backends or names
    print(f"DenseNet-BC k=12, 32x32, batch {batch}, one training step (SGD) on {device}, float32", flush=True)
    rows = run(tuple(args.depths), batch, names, str(device))
    print(table(rows))
    for name, why in skipped.items():
        if name not in names:
            print(f"not run: {name}: {why}")


if __name__ == "__main__":
    main()
