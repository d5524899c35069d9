"""Ahead-of-time compilation of every Triton kernel and autotune configuration for sm_80 and sm_90 on a machine
without a GPU (``triton.compile`` with ``GPUTarget``, ptxas included), reporting registers, spills and shared
memory (run ``pytest -s`` to see the table, or ``python -m effdense.kernels.aot``).

Interpreted kernels (``TRITON_INTERPRET=1``, which conftest.py sets without a GPU) cannot be compiled, so the
compile runs in a subprocess with ``TRITON_INTERPRET`` unset. ``--quick`` keeps it near two minutes on two
cores: sm_90 gets every variant, sm_80 the bf16 3x3-with-dropout variant of each kernel and config.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _can_target_cuda() -> str | None:
    try:
        from triton.backends import backends as registered
    except ImportError as err:
        return f"triton.backends unavailable: {err}"
    return None if "nvidia" in registered else "triton has no NVIDIA backend"


@pytest.mark.skipif(_can_target_cuda() is not None, reason=str(_can_target_cuda()))
def test_aot_compile_every_kernel_and_config():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "effdense.kernels.aot", "--arch", "80,90",
                           "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    rows = [line for line in proc.stdout.splitlines() if re.search(r"\s(80|90)\s", line)]
    from effdense.kernels import aot
    kernels = {k.__name__ for k, _, _ in aot.variants()}
    for name in kernels:
        for arch in ("80", "90"):
            assert any(r.split()[0] == name and r.split()[1] == arch for r in rows), (name, arch)
    assert "0 failure(s)" in proc.stdout
