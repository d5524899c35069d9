"""``python -m effdense.demo``: every backend that can run, times taken without the profiler, a quiet console."""
from __future__ import annotations

import os

import torch

from effdense import backends
from effdense.tools import demo


def test_demo_runs_every_runnable_backend_quietly(monkeypatch, capfd):
    """Per model: a warm-up step, the memory step (profiled) and the timed step, which must run unprofiled; the
    profiler's USDT lines, written to file descriptor 2 by its C++ side, stay off the console."""
    profiled, real = [], demo.training_step

    def step(*args):
        inner = real(*args)

        def run():
            profiled.append(torch.autograd.profiler._is_profiler_enabled)
            inner()
        return run

    monkeypatch.setattr(demo, "training_step", step)
    demo.main(["--depths", "10", "--batch-size", "2", "--device", "cpu"])
    out, err = capfd.readouterr()
    names, skipped = demo.runnable(torch.device("cpu"))
    assert {"naive", "checkpoint", "torch"} <= set(names)
    assert set(names) | set(skipped) == set(backends.BACKENDS)
    if backends.unavailable_reason("cpp", "cpu") is None:
        assert "cpp" in names
    rows = [line.split() for line in out.splitlines() if line.startswith("   10")]
    assert [r[1] for r in rows] == names and all(float(r[4]) > 0 for r in rows)
    assert profiled == [False, True, False] * len(names)
    assert "USDT" not in err and "profiler_start" not in out + err
    for name, why in skipped.items():
        assert f"not run: {name}: {why}" in out


def test_quiet_profiler_passes_other_output_on(capfd):
    with demo.quiet_profiler():
        os.write(2, b"USDT:2026 x.cpp:52] profiler_start\na real warning\n")
    assert capfd.readouterr().err == "a real warning\n"
