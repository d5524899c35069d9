"""Ahead-of-time compilation of every kernel and autotune configuration for real GPU targets, on any machine.

``python -m effdense.kernels.aot [--arch 80,90] [--quick]`` compiles each kernel of :mod:`effdense.kernels` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (ptxas included, no GPU needed) for
every autotune config and the constexpr variants the backend launches, and prints registers, spills (stack
bytes) and shared memory per compile from the cubin's resource usage (``cuobjdump``). Exits non-zero when a
compile fails. Must run with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled), so the test
runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from . import bn_bwd, dgrad, fwd, transition, wgrad

_FLOATS = {"drop_p", "drop_scale", "inv_npix"}


@dataclass
class Variant:
    """One kernel specialization: pointer dtypes (``"*fp32"``...) and constexprs other than the config's."""

    label: str
    pointers: dict[str, str]
    constexprs: dict


def _ptrs(names: str, dt: str) -> dict[str, str]:
    return {n: f"*{dt}" for n in names.split()}


def _fp32(names: str) -> dict[str, str]:
    return _ptrs(names, "fp32")


def variants() -> list[tuple[object, list, list[Variant]]]:
    """``(kernel, configs, variants)`` for every kernel: what the backend launches, fp32 and bf16."""
    out = []
    v_fwd, v_dgr, v_wgr = [], [], []
    # (label, storage dtype, dot precision): fp32 with tf32 off (the exact path), tf32, and bf16 (autocast)
    for name, dt, prec in (("fp32", "fp32", "ieee"), ("tf32", "fp32", "tf32"), ("bf16", "bf16", "ieee")):
        # conv1x1 of a bottleneck (reads F, writes Z) and conv3x3 with dropout (writes F); the exact fp32
        # path only for the 3x3, which is a superset of the 1x1's code
        for ks, drop in ((1, False), (3, True)) if name != "fp32" else ((3, True),):
            label = f"{name} ks={ks} dropout={int(drop)}"
            v_fwd.append(Variant(label, {**_ptrs("x_ptr w_ptr y_ptr", dt),
                                         **_fp32("scale_ptr shift_ptr cnt_ptr mean_ptr m2_ptr")},
                                 dict(KS=ks, HAS_DROPOUT=drop, STATS=True, PRECISION=prec)))
            # dgrad: gy is G (fp32) for the 3x3 with dropout, gZ (fp32) for the 1x1; x is F or Z
            v_dgr.append(Variant(label, {**_fp32("gy_ptr scale_ptr shift_ptr mean_ptr invstd_ptr g_ptr "
                                                 "dbeta_ptr dgamma_ptr"), **_ptrs("w_ptr x_ptr", dt)},
                                 dict(KS=ks, HAS_DROPOUT=drop, PRECISION=prec)))
            v_wgr.append(Variant(label, {**_fp32("gy_ptr scale_ptr shift_ptr dw_ptr"), **_ptrs("x_ptr", dt)},
                                 dict(KS=ks, HAS_DROPOUT=drop, PRECISION=prec,
                                      DOT_DTYPE=tl.float32 if dt == "fp32" else tl.bfloat16)))
    out.append((fwd.bn_relu_conv_fwd_kernel, fwd.CONFIGS, v_fwd))
    out.append((dgrad.conv_dgrad_bn_relu_kernel, dgrad.CONFIGS, v_dgr))
    out.append((wgrad.conv_wgrad_kernel, wgrad.CONFIGS, v_wgr))
    bwd_cfg = triton.Config({"BLOCK_P": bn_bwd.BLOCK_P, "BLOCK_C": bn_bwd.BLOCK_C}, num_warps=4, num_stages=1)
    out.append((bn_bwd.bn_bwd_apply_kernel, [bwd_cfg],
                [Variant(f"{dt} accumulate", {**_fp32("g_ptr out_ptr scale_ptr mean_ptr invstd_ptr dbeta_ptr "
                                                      "dgamma_ptr"), **_ptrs("x_ptr", dt)},
                         dict(BATCH_STATS=True, ACCUMULATE=True)) for dt in ("fp32", "bf16")]))
    # the transition (x: the block's output F, fp32 or bf16; gy: the next block's input gradient, fp32)
    v_tf, v_td, v_tw = [], [], []
    for name, dt, prec in (("fp32", "fp32", "ieee"), ("tf32", "fp32", "tf32"), ("bf16", "bf16", "ieee")):
        v_tf.append(Variant(name, {**_ptrs("x_ptr w_ptr y_ptr", dt), **_fp32("scale_ptr shift_ptr")},
                            dict(PRECISION=prec)))
        v_td.append(Variant(name, {**_fp32("gy_ptr scale_ptr shift_ptr mean_ptr invstd_ptr g_ptr dbeta_ptr "
                                           "dgamma_ptr"), **_ptrs("w_ptr x_ptr", dt)}, dict(PRECISION=prec)))
        v_tw.append(Variant(name, {**_fp32("gy_ptr scale_ptr shift_ptr dw_ptr"), **_ptrs("x_ptr", dt)},
                            dict(PRECISION=prec, DOT_DTYPE=tl.float32 if dt == "fp32" else tl.bfloat16)))
    out.append((transition.transition_fwd_kernel, transition.FWD_CONFIGS, v_tf))
    out.append((transition.transition_dgrad_kernel, transition.DGRAD_CONFIGS, v_td))
    out.append((transition.transition_wgrad_kernel, transition.WGRAD_CONFIGS, v_tw))
    return out


#: channel strides, specialized to 1 as Triton's JIT does for channels-last tensors (the fast layout)
CHANNEL_STRIDES = ("sxc", "syc", "sgc", "soc")


def signature(kernel, variant: Variant, config) -> tuple[dict, dict]:
    const = {**variant.constexprs, **config.kwargs,
             **{name: 1 for name in CHANNEL_STRIDES if name in kernel.arg_names}}
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in variant.pointers:
            sig[name] = variant.pointers[name]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name.endswith("_ptr"):
            raise KeyError(f"{kernel.__name__}: no dtype for pointer {name}")
        else:
            sig[name] = "i32"   # sizes, strides, seed: what the JIT specializes values < 2^31 to
    return sig, const


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK`` (spill bytes), ``SHARED``, ``LOCAL`` of the cubin's kernel from ``cuobjdump``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_one(kernel, variant: Variant, config, arch: int):
    sig, const = signature(kernel, variant, config)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--quick", action="store_true",
                    help="on archs other than the last, only the bf16 3x3 dropout variant (the 1x1's code is a subset)")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",")]
    failures = 0
    print(f"triton {triton.__version__}")
    print(f"{'kernel':28} {'sm':>3} {'variant':26} {'config':34} {'regs':>4} {'spill':>5} {'smem':>6} {'s':>5}")
    for kernel, configs, vs in variants():
        if args.kernel not in kernel.__name__:
            continue
        for arch in archs:
            for v in vs:
                if args.quick and arch != archs[-1] and (not v.label.startswith("bf16") or "ks=1" in v.label):
                    continue
                for cfg in configs:
                    cfg_s = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={x}" for k, x in cfg.kwargs.items())
                    cfg_s += f" w{cfg.num_warps} s{cfg.num_stages}"
                    t0 = time.time()
                    try:
                        ck = compile_one(kernel, v, cfg, arch)
                    except Exception as err:  # noqa: BLE001 - report every failure, then fail
                        failures += 1
                        print(f"{kernel.__name__:28} {arch:>3} {v.label:26} {cfg_s:34} FAILED: "
                              f"{type(err).__name__}: {str(err)[:400]}")
                        continue
                    ru = resource_usage(ck.asm["cubin"])
                    print(f"{kernel.__name__:28} {arch:>3} {v.label:26} {cfg_s:34} {ru.get('REG', -1):>4} "
                          f"{ru.get('STACK', -1):>5} {ck.metadata.shared:>6} {time.time() - t0:5.1f}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
