#!/usr/bin/env python3
"""Compile check of effdense's CUDA sources on a machine with nvcc but no GPU (run by CI and by
tests/csrc/test_cuda_compile.py).

1. Every ``csrc/cuda/*.cu`` is compiled with plain nvcc (no torch headers) for each architecture (default
   sm_80 and sm_90) with warnings as errors (``-Werror all-warnings``, host ``-Wall -Wextra -Werror``) and
   ``--resource-usage``; the report lists, per kernel and architecture, registers, spill stores/loads,
   stack frame and static shared memory.
2. The torch glue ``csrc/cuda/*.cpp`` (with ``--all-glue`` also ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``, for their
   CUDA branches and registrations) is syntax-checked with ``-DWITH_CUDA -fopenmp`` against the installed PyTorch's headers
   (the CUDA build check, csrc/cuda_build_check.sh, compiles it for real). A CPU-only PyTorch wheel
   lacks the generated ``c10/cuda/impl/cuda_cmake_macros.h``; a stand-in is generated in a temporary
   directory for this check only. Skipped with ``--no-glue`` or when PyTorch is not importable.

Exit status 0 when everything compiles cleanly. ``--json FILE`` writes the report as JSON.
Usage: python csrc/check_compile.py [--arch 80 --arch 90] [--nvcc PATH] [--json FILE] [--no-glue | --all-glue]
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def find_nvcc(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    nvcc = find_nvcc()
    if nvcc and os.path.exists(os.path.join(os.path.dirname(nvcc), "cu++filt")):
        tool = os.path.join(os.path.dirname(nvcc), "cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """``effdense::cuda::(anonymous namespace)::kernel<T, ...>(args)`` -> ``kernel<T, ...>``."""
    for prefix in ("(anonymous namespace)::", "effdense::cuda::"):
        name = name.replace(prefix, "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut]


def parse_ptxas(text: str) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                   "spill_loads": 0, "stack": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    return rows


def compile_cu(nvcc: str, src: str, archs: list[str], outdir: str) -> tuple[int, str]:
    cmd = [nvcc, "-std=c++17", "-O3", "-c", src, "-o", os.path.join(outdir, os.path.basename(src) + ".o"),
           "-I", os.path.join(HERE, "cuda"), "--expt-relaxed-constexpr", "-lineinfo",
           # as torch.utils.cpp_extension compiles them: no implicit half/bfloat16 conversions or operators
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__",
           "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "--resource-usage"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, " ".join(cmd) + "\n" + p.stdout + p.stderr


def glue_check(sources: list[str], outdir: str) -> tuple[int, str]:
    """Syntax check of the CUDA glue with -DWITH_CUDA against the installed PyTorch headers."""
    try:
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001
        return 0, f"skipped: PyTorch not importable ({err})"
    incs = cpp_extension.include_paths()
    stub = os.path.join(outdir, "stub")
    if not any(os.path.exists(os.path.join(i, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for i in incs):
        os.makedirs(os.path.join(stub, "c10", "cuda", "impl"), exist_ok=True)
        with open(os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    nvcc = find_nvcc()
    cuda_inc = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include") if nvcc else None
    cxx = os.environ.get("CXX", "c++")
    logs, rc = [], 0
    for src in sources:
        # -fopenmp as setup.py builds them: cpu/bn.cpp's `#pragma omp simd` is an unknown pragma (-Werror) without it
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-fopenmp", "-DWITH_CUDA", "-Wall", "-Wextra", "-Werror", "-I",
               stub, "-I", HERE]
        for inc in incs + ([cuda_inc] if cuda_inc else []) + [sysconfig.get_paths()["include"]]:
            cmd += ["-isystem", inc]
        p = subprocess.run(cmd + [src], capture_output=True, text=True)
        rc = rc or p.returncode
        logs.append(f"{os.path.relpath(src, HERE)}: {'ok' if p.returncode == 0 else 'FAILED'}\n{p.stdout}{p.stderr}")
    return rc, "".join(logs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="SM architecture, e.g. 80 (repeatable; default 80 and 90)")
    ap.add_argument("--nvcc")
    ap.add_argument("--json", help="write the report to this JSON file")
    ap.add_argument("--no-glue", action="store_true", help="skip the syntax check of csrc/cuda/*.cpp")
    ap.add_argument("--all-glue", action="store_true",
                    help="also syntax-check csrc/*.cpp and csrc/cpu/*.cpp with WITH_CUDA")
    args = ap.parse_args(argv)
    archs = [a.removeprefix("sm_") for a in (args.arch or ["80", "90"])]
    nvcc = find_nvcc(args.nvcc)
    if not nvcc:
        print("nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return 2
    sources = sorted(os.path.join(HERE, "cuda", f) for f in os.listdir(os.path.join(HERE, "cuda")) if f.endswith(".cu"))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    report = {"nvcc": version[-1] if version else "?",
              "archs": archs, "files": {}, "kernels": []}
    ok = True
    with tempfile.TemporaryDirectory() as tmp, futures.ThreadPoolExecutor(int(os.environ.get("MAX_JOBS", "2"))) as ex:
        jobs = {src: ex.submit(compile_cu, nvcc, src, archs, tmp) for src in sources}
        def cpp(folder):  # as effdense/_build.py's sources() takes them
            return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".cpp"))
        glue = cpp(os.path.join(HERE, "cuda")) + (cpp(HERE) + cpp(os.path.join(HERE, "cpu")) if args.all_glue else [])
        glue_job = None if args.no_glue else ex.submit(glue_check, glue, tmp)
        for src, job in jobs.items():
            rc, log = job.result()
            name = os.path.relpath(src, HERE)
            report["files"][name] = "ok" if rc == 0 else "FAILED"
            if rc != 0:
                ok = False
                print(f"== {name}: FAILED\n{log}")
            rows = parse_ptxas(log)
            for r in rows:
                r["file"] = name
            report["kernels"] += rows
        if glue_job is not None:
            rc, log = glue_job.result()
            report["glue"] = "ok" if rc == 0 else "FAILED"
            if rc != 0:
                ok = False
            print(f"== glue syntax check (-DWITH_CUDA): {log.strip()}")
    names = demangle(sorted({r["kernel"] for r in report["kernels"]}))
    for r in report["kernels"]:
        r["kernel"] = short(names.get(r["kernel"], r["kernel"]))
    print(f"{'file':<16} {'arch':<6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
    for r in sorted(report["kernels"], key=lambda r: (r["file"], r["arch"], r["kernel"])):
        print(f"{r['file']:<16} {r['arch']:<6} {r['registers'] or 0:>4} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['stack']:>5} {r['smem']:>6}  {r['kernel']}")
    spills = [r for r in report["kernels"] if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(report['kernels'])} kernel builds, {len(spills)} with spills; files: "
          + ", ".join(f"{k} {v}" for k, v in report["files"].items()))
    report["ok"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
