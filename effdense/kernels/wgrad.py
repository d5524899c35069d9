"""Conv weight gradient (1x1 or 3x3) with the BN-ReLU activation recomputed in the prologue.

``dw[co, ci, tap] = sum_p gy[p, co] * relu(x[p + tap, ci] * scale + shift)`` (zero padding on the activation):
a GEMM ``[Cout, P] x [P, Cin]`` per tap whose reduction runs over the ``P`` pixels.

Fuses: dropout mask regenerated from its seed on ``gy`` + BN-ReLU recomputation of the activation (never
stored) + the GEMM with fp32 accumulation. The pixel reduction is split over ``SPLIT`` programs writing fp32
partials that are summed afterwards (deterministic, unlike atomics): DenseNet weight gradients are small
(``Cout*Cin*9``) while ``P`` is large, so the split is where the parallelism is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (bn_relu_tile, check_pixels, dot_precision, dropout_scale, launch, make_configs, maybe_autotune,
                     offset, pixel_block, shifted, strides4)

#: every config's BLOCK_P divides this; each split program reduces a multiple of it
P_QUANTUM = 128
#: pixels one split program reduces, at least (about; rounded up to P_QUANTUM)
P_PER_PROGRAM = 2048

_KEYS = ("BLOCK_CO", "BLOCK_CI", "BLOCK_P")
#: autotune space (BLOCK_CO, BLOCK_CI, BLOCK_P, warps, stages): no spills on sm_80/sm_90 in fp32, tf32 and bf16
#: but 8 bytes in the smallest bf16 1x1 config on sm_90 (python -m effdense.kernels.aot)
CONFIGS = make_configs(_KEYS, [(16, 32, 64, 4, 2), (32, 64, 64, 8, 3), (64, 64, 32, 8, 2)])
DEFAULT = make_configs(_KEYS, [(16, 16, 32, 4, 1)])[0]


@triton.jit
def conv_wgrad_kernel(
    gy_ptr,         # [N, Cout, H, W] strided gradient of the conv output (G[:, c:c+k] or gZ)
    x_ptr,          # [N, Cin, H, W] strided BN-ReLU input (F[:, :c] or Z)
    scale_ptr, shift_ptr,   # [Cin] fp32
    dw_ptr,         # [SPLIT, Cout, Cin, KS, KS] fp32 partial weight gradients
    seed, drop_p, drop_scale,   # dropout on gy (HAS_DROPOUT)
    N, H, W, Cout, Cin, P_CHUNK,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    KS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_co = tl.program_id(0)
    pid_ci = tl.program_id(1) // (KS * KS)
    tap = tl.program_id(1) % (KS * KS)
    split = tl.program_id(2)
    dh = tap // KS - KS // 2
    dw = tap % KS - KS // 2
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < Cout
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < Cin
    sc = tl.load(scale_ptr + offs_ci, mask=ci_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_ci, mask=ci_mask, other=0.0)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    p_start = split * P_CHUNK
    for p0 in range(0, P_CHUNK, BLOCK_P):
        offs_p, p_mask, n, h, w = pixel_block(p_start + p0, BLOCK_P, N, H, W)
        g_mask = co_mask[:, None] & p_mask[None, :]
        gy = tl.load(gy_ptr + offs_co[:, None].to(tl.int64) * sgc + offset(n, h, w, sgn, sgh, sgw)[None, :],
                     mask=g_mask, other=0.0).to(tl.float32)       # [BLOCK_CO, BLOCK_P]
        if HAS_DROPOUT:
            gy = gy * tl.trans(dropout_scale(seed, offs_p, offs_co, Cout, drop_p, drop_scale))
        hh, ww, valid = shifted(h, w, p_mask, dh, dw, H, W)
        a_mask = valid[:, None] & ci_mask[None, :]
        x = tl.load(x_ptr + offset(n, hh, ww, sxn, sxh, sxw)[:, None] + offs_ci[None, :].to(tl.int64) * sxc,
                    mask=a_mask, other=0.0)                      # [BLOCK_P, BLOCK_CI]
        a = bn_relu_tile(x, sc, sh, a_mask)
        acc = tl.dot(gy.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    base = dw_ptr + split.to(tl.int64) * Cout * Cin * (KS * KS) + tap
    tl.store(base + (offs_co[:, None] * Cin + offs_ci[None, :]) * (KS * KS), acc,
             mask=co_mask[:, None] & ci_mask[None, :])


_kernel, _default = maybe_autotune(conv_wgrad_kernel, CONFIGS, ["Cout", "Cin", "KS", "HAS_DROPOUT", "P_CHUNK"],
                                   DEFAULT)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def conv_wgrad(gy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, ks: int,
               compute_dtype: torch.dtype, drop_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Weight gradient ``[Cout, Cin, ks, ks]`` (fp32) of ``y = conv(relu(x * scale + shift), w)`` for the
    incoming ``gy`` ``[N, Cout, H, W]`` (scaled by the dropout mask of ``seed`` when ``drop_p > 0``);
    ``x`` ``[N, Cin, H, W]``, both with any strides. GEMM operands are cast to ``compute_dtype``."""
    n, cout, h, wd = gy.shape
    cin = x.shape[1]
    npix = n * h * wd
    check_pixels(npix)
    split = max(1, triton.cdiv(npix, P_PER_PROGRAM))
    chunk = triton.cdiv(triton.cdiv(npix, split), P_QUANTUM) * P_QUANTUM
    split = triton.cdiv(npix, chunk)
    part = torch.empty(split, cout, cin, ks, ks, dtype=torch.float32, device=gy.device)
    grid = lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]),  # noqa: E731
                         triton.cdiv(cin, meta["BLOCK_CI"]) * ks * ks, split)
    launch(_kernel, _default, grid,
           gy, x, scale, shift, part, seed, float(drop_p), 1.0 / (1.0 - drop_p),
           n, h, wd, cout, cin, chunk, *strides4(gy), *strides4(x),
           KS=ks, HAS_DROPOUT=drop_p > 0, PRECISION=dot_precision(compute_dtype),
           DOT_DTYPE=_TL_DTYPES[compute_dtype])
    return part.sum(0)
