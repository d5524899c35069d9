"""The resident memory a CPU training step adds, in a fresh process, beside the allocator's peak.

The allocator's peak (:func:`effdense.tools.measure.measure_step`) counts what PyTorch's CPU allocator hands out; what a
machine must have is the process's resident memory, which also holds anything allocated past PyTorch (a
backend's own ``std::vector``, a library's scratch) and glibc's free heap. This measures how far a step raises
the resident set: the high-water mark is reset through ``/proc/self/clear_refs`` after freed heap memory is
handed back (``malloc_trim``) and the backends' workspaces are released, so the step maps again what it needs.
It runs in a fresh process per configuration, since what earlier models left in glibc's heap (the speed suite
runs several backends in one process) changes the figure. With glibc's dynamic mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``, the ``fixed_mmap`` figure) large blocks are mapped and unmapped with their tensors
and the rise follows the live bytes: the gap between the two is glibc's heap, not memory a backend hides.

``python -m benchmarks.rss --backend cpp --depth 100 --batch 32`` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

from effdense import release_workspace
from effdense.tools.measure import measure_step

from .common import LAYOUTS, Step, build_model, input_size

#: the environment of the ``fixed_mmap`` figure: blocks from 1 MiB up are mapped and unmapped one by one
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
TIMEOUT_S = 600


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_step_bytes(step: Callable[[], object]) -> int | None:
    """How far ``step()`` raises this process's resident memory at its high point (VmHWM after it minus VmRSS
    before it; see the module docstring). None where ``/proc/self/clear_refs`` is missing (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    release_workspace()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before) * 1024


def probe(name: str, depth: int | None, k: int, backend: str, batch: int, dtype: str, layout: str,
          warmup: int = 3, reps: int = 3) -> dict:
    """Allocator peak and median resident-memory rise of a warm training step, in this process."""
    torch.manual_seed(0)
    model = build_model(name, depth, k, backend, torch.device("cpu")).to(memory_format=LAYOUTS[layout])
    step = Step(model, batch, input_size(name), dtype, torch.device("cpu"))
    step.x = step.x.contiguous(memory_format=LAYOUTS[layout])
    for _ in range(warmup):
        step.step()
    peak = measure_step(step.step, "cpu").peak_bytes
    rises = [rss_step_bytes(step.step) for _ in range(reps)]
    return {"peak_bytes": peak, "rss_step_bytes": None if None in rises else int(statistics.median(rises))}


def in_fresh_process(name: str, depth: int | None, k: int, backend: str, batch: int, dtype: str, layout: str,
                     env: dict | None = None) -> dict:
    """:func:`probe` in a new Python process (with ``env`` added to the environment, the same thread count)."""
    cmd = [sys.executable, "-m", "benchmarks.rss", "--model", name, "--growth-rate", str(k), "--backend", backend,
           "--batch", str(batch), "--dtype", dtype, "--layout", layout, "--threads", str(torch.get_num_threads())]
    if depth is not None:
        cmd += ["--depth", str(depth)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(cmd, cwd=root, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmarks.rss failed for {backend} batch {batch}: {tail}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def rss_fields(name: str, depth: int | None, k: int, backend: str, batch: int, dtype: str, layout: str) -> dict:
    """The speed suite's resident-memory fields of one eager CPU row: glibc's defaults and ``fixed_mmap``."""
    out = {}
    for suffix, env in (("", None), ("_fixed_mmap", FIXED_MMAP)):
        got = in_fresh_process(name, depth, k, backend, batch, dtype, layout, env)
        out[f"rss_step_bytes{suffix}"] = got["rss_step_bytes"]
        out[f"rss_peak_bytes{suffix}"] = got["peak_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rss", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bc", help="'bc' (DenseNet-BC of --depth) or an effdense.MODELS key")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--growth-rate", type=int, default=12)
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.model == "bc" and a.depth is None:
        ap.error("--depth is required with --model bc")
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(probe(a.model, a.depth, a.growth_rate, a.backend, a.batch, a.dtype, a.layout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
