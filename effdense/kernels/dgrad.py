"""Conv input gradient (1x1 GEMM or 3x3 implicit GEMM) fused with the BN-ReLU backward reductions.

For ``y = conv(relu(bn(x)), w)`` and the incoming ``gy``: ``gA = conv_transpose(gy, w)`` (the GEMM
``[P, Cout] x [Cout, Cin]`` per tap, taps mirrored), then in the epilogue the ReLU mask and the two per-channel
sums of the BN backward (:func:`effdense.backends.bn.bn_relu_backward`)::

    g = gA * [x * scale + shift > 0],   dbeta = sum_p g,   dgamma = sum_p g * (x - mean) * invstd

Fuses: dropout mask regenerated from its seed in the prologue (on ``gy``) + the dgrad GEMM (fp32 accumulation)
+ ReLU backward + per-tile partial sums of ``dbeta``/``dgamma`` in the epilogue. The result ``g`` is stored
(fp32, ``[P, Cin]``, a transient) for :func:`effdense.kernels.bn_bwd.bn_bwd_apply`, which needs the complete
sums before it can finish ``dx``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (check_pixels, dot_precision, dropout_scale, launch, load_rows, make_configs, maybe_autotune,
                     offset, pixel_block, shifted, strides4)

MIN_BLOCK_P = 32

_KEYS = ("BLOCK_P", "BLOCK_N", "BLOCK_K")
#: autotune space (BLOCK_P, BLOCK_N, BLOCK_K, warps, stages): bf16 compiles without
#: spills on sm_80/sm_90; tf32/fp32 3x3 spill a few dozen bytes in the largest (python -m effdense.kernels.aot)
CONFIGS = make_configs(_KEYS, [(64, 32, 16, 4, 2), (64, 64, 32, 8, 2), (128, 32, 32, 8, 2)])
DEFAULT = make_configs(_KEYS, [(MIN_BLOCK_P, 16, 16, 4, 1)])[0]


@triton.jit
def conv_dgrad_bn_relu_kernel(
    gy_ptr,         # [N, Cout, H, W] strided incoming gradient (G[:, c:c+k] or gZ), any float dtype
    w_ptr,          # [KS, KS, Cout, Cin] contiguous conv weight (compute dtype)
    x_ptr,          # [N, Cin, H, W] strided input of the BN-ReLU (Z or F[:, :c])
    scale_ptr, shift_ptr, mean_ptr, invstd_ptr,   # [Cin] fp32 BN parameters (batch or running stats)
    g_ptr,          # [P, Cin] fp32 out: gradient after the ReLU mask, before the BN backward
    dbeta_ptr,      # [T, Cin] fp32 tile sums of g
    dgamma_ptr,     # [T, Cin] fp32 tile sums of g * xhat
    seed, drop_p, drop_scale,   # dropout applied to gy (HAS_DROPOUT), same Philox stream as the forward
    N, H, W, Cout, Cin,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    KS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_p, p_mask, n, h, w = pixel_block(pid_p * BLOCK_P, BLOCK_P, N, H, W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # input channels ci
    n_mask = offs_n < Cin
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for tap in range(KS * KS):
        # forward: y[h] += a[h + d] w[d]  =>  gA[h] += gy[h - d] w[d]
        hh, ww, valid = shifted(h, w, p_mask, KS // 2 - tap // KS, KS // 2 - tap % KS, H, W)
        g_row = gy_ptr + offset(n, hh, ww, sgn, sgh, sgw)
        w_tap = w_ptr + tap * Cout * Cin
        for k0 in range(0, Cout, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            gy, k_mask, _ = load_rows(g_row, offs_k, sgc, Cout, valid)
            gy = gy.to(tl.float32)
            if HAS_DROPOUT:
                gy = gy * dropout_scale(seed, (n * H + hh) * W + ww, offs_k, Cout, drop_p, drop_scale)
            wt = tl.load(w_tap + offs_k[:, None] * Cin + offs_n[None, :],
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(gy.to(wt.dtype), wt, acc, input_precision=PRECISION)
    # epilogue: ReLU backward and the BN backward's per-channel partial sums
    out_mask = p_mask[:, None] & n_mask[None, :]
    x = tl.load(x_ptr + offset(n, h, w, sxn, sxh, sxw)[:, None] + offs_n[None, :].to(tl.int64) * sxc,
                mask=out_mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    mu = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0)
    rs = tl.load(invstd_ptr + offs_n, mask=n_mask, other=0.0)
    pre = x * sc[None, :] + sh[None, :]
    g = tl.where(out_mask & ~(pre <= 0.0), acc, 0.0)     # passes where pre > 0 or NaN, as threshold_backward
    tl.store(g_ptr + offs_p[:, None].to(tl.int64) * Cin + offs_n[None, :], g, mask=out_mask)
    xhat = (x - mu[None, :]) * rs[None, :]
    tl.store(dbeta_ptr + pid_p.to(tl.int64) * Cin + offs_n, tl.sum(g, axis=0), mask=n_mask)
    tl.store(dgamma_ptr + pid_p.to(tl.int64) * Cin + offs_n, tl.sum(tl.where(out_mask, g * xhat, 0.0), axis=0),
             mask=n_mask)


_kernel, _default = maybe_autotune(conv_dgrad_bn_relu_kernel, CONFIGS, ["Cout", "Cin", "KS", "HAS_DROPOUT"],
                                   DEFAULT)


def dgrad_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Conv weight ``[Cout, Cin, KS, KS]`` as the dgrad GEMM's B operand ``[KS, KS, Cout, Cin]``."""
    return w.to(dtype).permute(2, 3, 0, 1).contiguous()


def conv_dgrad_bn_relu(gy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, compute_dtype: torch.dtype,
                       drop_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``y = conv(relu(x * scale + shift), w)`` (``w`` ``[Cout, Cin, KS, KS]``, 'same' padding) and its
    incoming gradient ``gy`` ``[N, Cout, H, W]`` (scaled by the dropout mask of ``seed`` when ``drop_p > 0``):
    returns ``(g, dgamma, dbeta)``, ``g`` ``[P, Cin]`` fp32 the gradient behind the ReLU (pixels in NHW
    order), ``dbeta = sum g``, ``dgamma = sum g * (x - mean) * invstd`` per channel. The GEMM operands are
    cast to ``compute_dtype``."""
    n, cout, h, wd = gy.shape
    cin = w.shape[1]
    npix = n * h * wd
    check_pixels(npix)
    wg = dgrad_weight(w, compute_dtype)
    t = triton.cdiv(npix, MIN_BLOCK_P)
    dev = gy.device
    g = torch.empty(npix, cin, dtype=torch.float32, device=dev)
    dbeta = torch.zeros(t, cin, dtype=torch.float32, device=dev)
    dgamma = torch.zeros(t, cin, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(npix, meta["BLOCK_P"]), triton.cdiv(cin, meta["BLOCK_N"]))  # noqa: E731
    launch(_kernel, _default, grid,
           gy, wg, x, scale, shift, mean, invstd, g, dbeta, dgamma,
           seed, float(drop_p), 1.0 / (1.0 - drop_p),
           n, h, wd, cout, cin, *strides4(gy), *strides4(x),
           KS=w.shape[-1], HAS_DROPOUT=drop_p > 0, PRECISION=dot_precision(compute_dtype))
    return g, dgamma.sum(0), dbeta.sum(0)
