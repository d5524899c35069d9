"""The compile set of a training step (:mod:`effdense.kernels.aot`): what a GPU compiles in the first step of
DenseNet-BC, traced on CPU with a dry run of the launchers, does not grow with depth; every size argument is
``do_not_specialize``; and the set compiles for sm_90 here (``triton.compile`` with ``GPUTarget``, ptxas
included) without register spills.

Interpreted kernels (``TRITON_INTERPRET=1``, which conftest.py sets without a GPU) cannot be compiled, so the
compile runs in a subprocess with ``TRITON_INTERPRET`` unset (``pytest -s`` shows its table).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import effdense  # noqa: E402
from effdense.kernels import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: distinct specializations of one DenseNet-BC (k=12) training step, batch 64 of 32x32 images, any depth
#: (cuDNN's default TF32 flag for fp32): 28 under bf16 autocast, 27 in fp32
COMPILE_SET_SIZE = {"bf16": 28, "fp32": 27}


def _can_target_cuda() -> str | None:
    try:
        from triton.backends import backends as registered
    except ImportError as err:
        return f"triton.backends unavailable: {err}"
    return None if "nvidia" in registered else "triton has no NVIDIA backend"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("dtype", list(COMPILE_SET_SIZE))
def test_compile_set_is_the_same_for_bc100_and_bc250(dtype, monkeypatch):
    """DenseNet-BC-100 and -250 (k=12) launch the same specializations: the set does not grow with depth. Every
    pointer they pass is 16-byte aligned (the rows buffers and their column ranges are passed as the buffer's own
    pointer plus an offset), so the set is exactly what the listing compiles."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)     # the GPU default the listing assumes
    sets = {}
    for depth in (100, 250):
        torch.manual_seed(0)
        sets[depth] = aot.trace_step(effdense.densenet_cifar(depth=depth, growth_rate=12, backend="triton"),
                                     64, 32, dtype)
    assert set(sets[100]) == set(sets[250])
    assert len(sets[100]) == COMPILE_SET_SIZE[dtype]
    assert sum(sets[250].values()) > 2 * sum(sets[100].values())      # many more launches, the same compiles
    for spec in sets[100]:
        assert all(aligned for _, t, aligned in spec.signature if t.startswith("*")), spec
    precisions = {dict(s.constexprs).get("PRECISION") for s in sets[100]} - {None}
    assert precisions == ({"tf32"} if dtype == "fp32" else {"ieee"})


@pytest.mark.skipif(_can_target_cuda() is not None, reason=str(_can_target_cuda()))
def test_every_size_argument_is_do_not_specialize():
    """Outside the interpreter: each kernel's arguments other than pointers and constexprs are
    ``do_not_specialize``, so no size, offset or stride multiplies the compile set."""
    code = ("from effdense.kernels import aot\n"
            "for name, k in aot.kernels().items():\n"
            "    for p in k.params:\n"
            "        if not p.is_constexpr and not p.name.endswith('_ptr'):\n"
            "            assert p.do_not_specialize, (name, p.name)\n"
            "print(len(aot.kernels()), 'kernels')\n")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) >= 10


@pytest.mark.skipif(_can_target_cuda() is not None, reason=str(_can_target_cuda()))
def test_aot_compiles_the_bc100_compile_set_for_sm90_without_spills():
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "effdense.kernels.aot", "--model",
                           "densenet_bc_100_k12", "--dtype", "bf16", "--arch", "90"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    assert "0 failure(s)" in proc.stdout
    assert f"{COMPILE_SET_SIZE['bf16']} specializations" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\S+_?\S*\s+90\s+\d+\s+\d+", line)]
    assert len(rows) == COMPILE_SET_SIZE["bf16"]
    for row in rows:        # kernel, sm, launches, regs, spill bytes, shared memory, seconds, ...
        assert int(row[3]) <= 255 and int(row[4]) == 0, f"{row[0]} spills {row[4]} bytes: {' '.join(row)}"
    kernels = {r[0] for r in rows}
    assert {"conv1x1_fwd", "conv3x3_fwd", "conv1x1_dgrad", "conv3x3_dgrad", "conv1x1_wgrad", "conv3x3_wgrad",
            "bn_finalize", "bn_bwd_finalize", "bn_bwd_apply", "block_entry", "transition_fwd"} <= kernels
