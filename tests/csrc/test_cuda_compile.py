"""The CUDA sources compile cleanly with nvcc for sm_80 and sm_90 (warnings as errors) on a machine without a
GPU, and the CUDA glue passes a syntax check against the installed PyTorch headers (csrc/check_compile.py).
Skipped where nvcc is not found."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "csrc", "check_compile.py")

if not os.path.exists(SCRIPT):
    pytest.skip("csrc/check_compile.py is not in this checkout (installed package only)", allow_module_level=True)
sys.path.insert(0, os.path.dirname(SCRIPT))
import check_compile  # noqa: E402

NVCC = check_compile.find_nvcc()


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
def test_cuda_sources_compile_for_sm80_sm90(tmp_path):
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, SCRIPT, "--arch", "80", "--arch", "90", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    print(p.stdout[-6000:])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["archs"]) == {"80", "90"}
    assert all(v == "ok" for v in report["files"].values()) and len(report["files"]) >= 2
    kernels = {r["kernel"] for r in report["kernels"]}
    for name in ("reduce_cl_kernel", "elementwise_kernel", "finalize_kernel", "bn_relu_conv1x1_kernel"):
        assert any(name in k for k in kernels), name
    # the fp32/fp16/bf16 kernels must not spill (double-precision instantiations are for tests only)
    spills = [r for r in report["kernels"] if (r["spill_stores"] or r["spill_loads"]) and "double" not in r["kernel"]]
    assert not spills, spills


def test_glue_check_compiles_openmp_pragmas(tmp_path):
    """The glue syntax check compiles as setup.py does, with -fopenmp: cpu/bn.cpp's `#pragma omp simd` is otherwise
    an unknown pragma under -Werror (a one-loop source stands for it; no torch headers, so this is fast)."""
    src = tmp_path / "omp_simd.cpp"
    src.write_text("float dot(const float* a, const float* b, int n) {\n  float s = 0;\n"
                   "#pragma omp simd reduction(+ : s)\n  for (int i = 0; i < n; ++i) s += a[i] * b[i];\n"
                   "  return s;\n}\n")
    rc, log = check_compile.glue_check([str(src)], str(tmp_path))
    if log.startswith("skipped"):
        pytest.skip(log)
    assert rc == 0, log
