"""The compile set of a training step: every kernel specialization it launches, compiled ahead of time for a GPU.

``python -m effdense.tools.aot --model densenet_bc_100_k12 --dtype bf16`` runs one training step (forward,
cross-entropy, backward; batch 64 of 32x32 images by default) of the model on the ``triton`` backend in a
:func:`~effdense.kernels.common.dry_run`: every launcher runs (heuristic configs, argument checks, workspace
sizing) and records the specialization it would launch (kernel, argument types with pointer alignment,
constexprs, warps, stages; :class:`~effdense.kernels.common.Spec`) instead of launching. This runs on any
machine, without a GPU; fp32 dots follow the GPU's TF32 rule. The distinct specializations are the set a GPU
compiles in the first step (no autotuning, and every size/offset argument ``do_not_specialize``, so the set
does not grow with depth). Each is then compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` (ptxas included) and its registers, spill stores (``STACK`` bytes) and
shared memory are printed from the cubin's resource usage (``cuobjdump``), with the PTX's float max/min
instructions: ``nanmax`` those that propagate NaN (``max.NaN.f32``: every ReLU), ``max`` those that drop it (none
may). Exits non-zero when a compile fails.

Register allocation differs between Triton releases (their pipelines and ptxas), so results are per version:
``--out DIR`` writes the listing (``.txt``) and the resources (``.json``) as ``DIR/<name>`` with the name of
:func:`result_name` (e.g. ``densenet_bc_100_k12-bf16-sm90-triton3.6``), what ``benchmarks/results/aot/`` holds;
``--json PATH`` writes the JSON only. Must run with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be
compiled); ``--list-only`` only traces.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch

from ..kernels import bn_bwd, dgrad, fwd, stats, transition, wgrad
from ..kernels.common import Spec, dry_run, precision_record

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def kernels() -> dict[str, object]:
    """Every ``@triton.jit`` kernel of the package by name."""
    out = {}
    for mod in (stats, fwd, dgrad, wgrad, bn_bwd, transition):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                out[name] = obj
    return out


def trace_step(model: torch.nn.Module, batch: int, size: int, dtype: str = "fp32") -> Counter:
    """``Counter`` of the :class:`Spec` s one training step of ``model`` (on CPU, ``triton`` backend) launches, with
    their launch counts; ``dtype`` "bf16"/"fp16" runs it under autocast, as ``effdense-train --amp`` does."""
    model = model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    record: list[Spec] = []
    with dry_run(record), torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    with dry_run(record):
        loss.backward()
    return Counter(record)


def model_specs(name: str, batch: int = 64, size: int = 32, dtype: str = "fp32", drop_rate: float = 0.0) -> Counter:
    """:func:`trace_step` of ``effdense.MODELS[name]`` on the ``triton`` backend."""
    import effdense
    torch.manual_seed(0)
    return trace_step(effdense.MODELS[name](backend="triton", drop_rate=drop_rate), batch, size, dtype)


def describe(spec: Spec) -> str:
    """One line: the constexprs and the non-fp32 pointer types of a specialization."""
    const = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in spec.constexprs)
    ptrs = ",".join(f"{n[:-4]}:{t[1:]}{'' if a else '!'}" for n, t, a in spec.signature
                    if t.startswith("*") and t != "*fp32")
    return f"{const} w{spec.num_warps} s{spec.num_stages}" + (f" [{ptrs}]" if ptrs else "")


def compile_spec(spec: Spec, arch: int):
    """``triton.compile`` of one specialization for ``sm_<arch>`` (pointer alignment as the JIT would see it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    kernel = kernels()[spec.kernel]
    const = dict(spec.constexprs)
    names = list(kernel.arg_names)
    types = {n: t for n, t, _ in spec.signature}
    signature = {n: "constexpr" if n in const else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t, aligned in spec.signature
             if aligned and t.startswith("*")}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK`` (spill bytes), ``SHARED``, ``LOCAL`` of the cubin's kernel from ``cuobjdump``."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


#: float max/min instructions of a PTX listing: NaN-propagating (``max.NaN.f32``) and NaN-dropping (``max.f32``)
_NAN_MAX = re.compile(r"\b(?:max|min)(?:\.ftz)?\.NaN(?:\.xorsign\.abs)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")
_PLAIN_MAX = re.compile(r"\b(?:max|min)(?:\.ftz)?(?:\.xorsign\.abs)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")


def float_max_counts(ptx: str) -> dict[str, int]:
    """``NANMAX``/``MAX``: the float max/min instructions of ``ptx`` that propagate NaN and that drop it."""
    return {"NANMAX": len(_NAN_MAX.findall(ptx)), "MAX": len(_PLAIN_MAX.findall(ptx))}


def result_name(model: str, dtype: str, no_tf32: bool, arch: str, triton_version: str) -> str:
    """The file name (without extension) of a compile listing in ``benchmarks/results/aot/``:
    ``<model>-<dtype>[-notf32]-sm<arch>-triton<major.minor>``."""
    version = ".".join(triton_version.split(".")[:2])
    tf32 = "-notf32" if no_tf32 and dtype == "fp32" else ""
    return f"{model}-{dtype}{tf32}-sm{arch.replace(',', '_')}-triton{version}"


def compile_row(spec: Spec, count: int, archs: list[int]) -> tuple[dict, list[str], int]:
    """Compile ``spec`` for each of ``archs``: its JSON row, its listing lines and the number of failures."""
    row = dict(kernel=spec.kernel, launches=count, constexprs=dict(spec.constexprs),
               signature=[list(s) for s in spec.signature], num_warps=spec.num_warps, num_stages=spec.num_stages,
               compiled={})
    lines, failures = [], 0
    for arch in archs or [None]:
        res = "-"
        t0 = time.time()
        if arch is not None:
            try:
                ck = compile_spec(spec, arch)
                ru = {**resource_usage(ck.asm["cubin"]), **float_max_counts(ck.asm["ptx"])}
                ru["SHARED"] = ck.metadata.shared
                row["compiled"][f"sm_{arch}"] = ru
                res = (f"{ru.get('REG', -1):>4} {ru.get('STACK', -1):>5} {ru['SHARED']:>6} {ru['NANMAX']:>6} "
                       f"{ru['MAX']:>3} {time.time() - t0:5.1f}")
            except Exception as err:  # noqa: BLE001 - report every failure, then fail
                failures += 1
                row["compiled"][f"sm_{arch}"] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
                res = f"FAILED: {type(err).__name__}: {str(err)[:200]}"
        lines.append(f"{spec.kernel[:-7]:24} {arch or '':>3} {count:>8} {res:>35}  {describe(spec)}")
    return row, lines, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="densenet_bc_100_k12", help="a name of effdense.MODELS")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="fp32, or autocast bf16/fp16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image size")
    ap.add_argument("--drop-rate", type=float, default=0.0, help="the model's dropout rate")
    ap.add_argument("--arch", default="90", help="comma-separated compute capabilities (default 90)")
    ap.add_argument("--list-only", action="store_true", help="trace and list, do not compile")
    ap.add_argument("--no-tf32", action="store_true", help="torch.backends.cudnn.allow_tf32 = False (exact fp32 dots)")
    ap.add_argument("--json", default="", help="write the listing and resources to this file")
    ap.add_argument("--out", default="", help="write <name>.txt and <name>.json into this folder (see result_name)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and not args.list_only:
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    import triton
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    specs = model_specs(args.model, args.batch, args.size, args.dtype, args.drop_rate)
    archs = [int(a) for a in args.arch.split(",")] if not args.list_only else []
    listing = [f"{args.model} {args.dtype} batch {args.batch} {args.size}x{args.size}: {len(specs)} specializations, "
               f"{sum(specs.values())} launches per training step; triton {triton.__version__}; "
               f"fp32 dot: {precision_record()['fp32_dot'] if args.dtype == 'fp32' else 'n/a'}",
               f"{'kernel':24} {'sm':>3} {'launches':>8} {'regs':>4} {'spill':>5} {'smem':>6} {'nanmax':>6} "
               f"{'max':>3} {'s':>5}  specialization"]
    for line in listing:
        print(line)
    rows, failures = [], 0
    for spec, count in sorted(specs.items(), key=lambda kv: (kv[0].kernel, describe(kv[0]))):
        row, lines, failed = compile_row(spec, count, archs)
        for line in lines:
            print(line, flush=True)
        rows.append(row)
        listing += lines
        failures += failed
    listing.append(f"{failures} failure(s)")
    print(listing[-1])
    _write(args, argv, triton.__version__, specs, archs, rows, listing)
    return 1 if failures else 0


def _write(args, argv, triton_version: str, specs: Counter, archs: list[int], rows: list, listing: list[str]) -> None:
    """The ``--json`` file and the ``--out`` pair (listing and JSON)."""
    paths = [args.json] if args.json else []
    if args.out:
        name = os.path.join(args.out, result_name(args.model, args.dtype, args.no_tf32, args.arch, triton_version))
        paths.append(name + ".json")
        os.makedirs(args.out, exist_ok=True)
        with open(name + ".txt", "w") as f:
            f.write("\n".join(listing) + "\n")
    out = dict(command=" ".join(["python -m effdense.tools.aot", *(argv if argv is not None else sys.argv[1:])]),
               model=args.model, dtype=args.dtype, batch=args.batch, size=args.size, drop_rate=args.drop_rate,
               triton=triton_version, torch=torch.__version__,
               precision=precision_record() if args.dtype == "fp32" else None,
               specializations=len(specs), launches=sum(specs.values()), archs=archs, kernels=rows)
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
