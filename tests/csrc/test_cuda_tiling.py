"""The index math of the fused BN-ReLU-Conv1x1 CUDA kernel, replayed on the CPU (tests/csrc/cuda_tiling_check.cpp
with csrc/cuda/conv1x1_tiling.h, plain C++): every stage element written once per k-step, chunk copies in
bounds and 16-byte aligned, zero fill untransformed, z equal to the reference product. No GPU needed."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER_DIR = os.path.join(ROOT, "csrc", "cuda")
CHECK = os.path.join(ROOT, "tests", "csrc", "cuda_tiling_check.cpp")
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")

pytestmark = [
    pytest.mark.skipif(not os.path.exists(os.path.join(HEADER_DIR, "conv1x1_tiling.h")),
                       reason="csrc/ is not in this checkout (installed package only)"),
    pytest.mark.skipif(CXX is None, reason="no C++ compiler (set CXX)"),
]


def test_conv1x1_tiling_matches_reference(tmp_path):
    exe = tmp_path / "tiling_check"
    build = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", HEADER_DIR, CHECK,
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("0 failures") and " 28 operand-path variants" in run.stdout, run.stdout
