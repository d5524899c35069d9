"""The compile set of a training step (:mod:`effdense.tools.aot`): what a GPU compiles in the first step of
DenseNet-BC, traced on CPU with a dry run of the launchers, does not grow with depth; every size argument is
``do_not_specialize``; and the set compiles for sm_90 here (``triton.compile`` with ``GPUTarget``, ptxas
included) without register spills and without a NaN-dropping float max (every ReLU is ``max.NaN.f32``).

Register allocation differs between Triton releases, so ``benchmarks/results/aot/`` holds one listing per Triton
version (``<model>-<dtype>[-notf32]-sm90-triton<X.Y>``): the compile test runs under whichever Triton is
installed and checks that version's committed listing (same specializations, registers, spills, shared memory);
every committed listing, of any version, lists the compile set the code traces now.

Interpreted kernels (``TRITON_INTERPRET=1``, which conftest.py sets without a GPU) cannot be compiled, so the
compile runs in a subprocess with ``TRITON_INTERPRET`` unset (``pytest -s`` shows its table).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import effdense  # noqa: E402
from effdense.tools import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "aot"
MODEL = "densenet_bc_100_k12"
#: distinct specializations of one DenseNet-BC (k=12) training step, batch 64 of 32x32 images, any depth
#: (cuDNN's default TF32 flag for fp32): 28 under bf16 autocast, 27 in fp32
COMPILE_SET_SIZE = {"bf16": 28, "fp32": 27}
#: the kernels that apply a ReLU: their PTX must have max.NaN.f32
RELU_KERNELS = {"conv1x1_fwd", "conv3x3_fwd", "conv1x1_wgrad", "conv3x3_wgrad", "transition_fwd", "transition_wgrad"}


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
    code = ("from effdense.tools import aot\n"
            "for name, k in aot.kernels().items():\n"
            "    for p in k.params:\n"
            "        if not p.is_constexpr and not p.name.endswith('_ptr'):\n"
            "            assert p.do_not_specialize, (name, p.name)\n"
            "print(len(aot.kernels()), 'kernels')\n")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[0]) >= 10


def _key(row: dict) -> tuple:
    """A listed specialization: kernel, constexprs, pointer types, warps, stages."""
    ptrs = tuple((n, t, a) for n, t, a in row["signature"] if t.startswith("*"))
    return row["kernel"], tuple(sorted(row["constexprs"].items())), ptrs, row["num_warps"], row["num_stages"]


def _resources(listing: dict, arch: str = "sm_90") -> dict:
    """``{specialization: compiled resources}`` of a listing (:func:`effdense.tools.aot.main`'s JSON)."""
    return {_key(row): row["compiled"][arch] for row in listing["kernels"]}


def _check_compiled(listing: dict, what: str) -> None:
    """No spill, no failure, no NaN-dropping float max/min anywhere, ``max.NaN`` in every ReLU kernel."""
    for key, res in _resources(listing).items():
        name = key[0][:-7]
        assert "error" not in res, f"{what}: {name} failed to compile: {res}"
        assert res["STACK"] == 0 and res["REG"] <= 255, f"{what}: {name} spills {res['STACK']} bytes: {key} {res}"
        assert res["MAX"] == 0, f"{what}: {name} has {res['MAX']} NaN-dropping max/min instructions: {key}"
        assert name not in RELU_KERNELS or res["NANMAX"] > 0, f"{what}: {name} has no max.NaN: {key}"


def _committed() -> list[Path]:
    return sorted(RESULTS.glob(f"{MODEL}-*-sm90-triton*.json"))


def test_committed_listings_are_per_triton_version_and_current(monkeypatch):
    """Listings for Triton 3.6 and 3.9, bf16 and fp32 (TF32 and exact); each lists exactly the compile set the code
    traces now (the trace does not depend on the Triton version) and records no spill and no NaN-dropping max."""
    names = {p.stem for p in _committed()}
    for version in ("3.6", "3.9"):
        for dtype, no_tf32 in (("bf16", False), ("fp32", False), ("fp32", True)):
            assert aot.result_name(MODEL, dtype, no_tf32, "90", version) in names, (version, dtype, no_tf32)
    traced = {}
    for path in _committed():
        listing = json.loads(path.read_text())
        no_tf32 = "-notf32-" in path.name
        if (listing["dtype"], no_tf32) not in traced:
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not no_tf32)
            torch.manual_seed(0)
            specs = aot.trace_step(effdense.MODELS[MODEL](backend="triton"), 64, 32, listing["dtype"])
            traced[listing["dtype"], no_tf32] = {_key(dict(kernel=s.kernel, constexprs=dict(s.constexprs),
                                                           signature=s.signature, num_warps=s.num_warps,
                                                           num_stages=s.num_stages)) for s in specs}
        assert set(_resources(listing)) == traced[listing["dtype"], no_tf32], f"{path.name} is stale: rerun its command"
        assert listing["triton"].startswith(path.stem.rsplit("-triton", 1)[1] + "."), path.name
        _check_compiled(listing, path.name)


@pytest.mark.skipif(_can_target_cuda() is not None, reason=str(_can_target_cuda()))
@pytest.mark.parametrize("dtype", list(COMPILE_SET_SIZE))
def test_aot_compiles_the_bc100_compile_set_for_sm90_without_spills(dtype, tmp_path):
    """The compile set under the installed Triton: no spill, NaN-propagating ReLUs, and exactly the resources its
    committed listing records."""
    out = tmp_path / "listing.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "effdense.tools.aot", "--model", MODEL, "--dtype",
                           dtype, "--arch", "90", "--json", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    got = json.loads(out.read_text())
    assert got["specializations"] == len(got["kernels"]) == COMPILE_SET_SIZE[dtype]
    _check_compiled(got, f"triton {triton.__version__} {dtype}")
    assert {k[0][:-7] for k in _resources(got)} >= {
        "conv1x1_fwd", "conv3x3_fwd", "conv1x1_dgrad", "conv3x3_dgrad", "conv1x1_wgrad", "conv3x3_wgrad",
        "bn_finalize", "bn_bwd_finalize", "bn_bwd_apply", "block_entry", "transition_fwd", "transition_dgrad"}
    name = aot.result_name(MODEL, dtype, False, "90", triton.__version__)
    committed = RESULTS / f"{name}.json"
    assert committed.exists(), f"no listing for triton {triton.__version__}: python -m effdense.tools.aot " \
                               f"--dtype {dtype} --out benchmarks/results/aot"
    assert _resources(json.loads(committed.read_text())) == _resources(got), \
        f"{committed.name} is stale: python -m effdense.tools.aot --dtype {dtype} --out benchmarks/results/aot"
