"""Finish the BN-ReLU backward and add the result into the gradient buffer in place.

With ``g`` from :func:`effdense.kernels.dgrad.conv_dgrad_bn_relu` (the gradient behind the ReLU) and its
complete per-channel sums ``dbeta``/``dgamma``::

    dx = scale * (g - dbeta / P - xhat * dgamma / P)      (batch statistics)
    dx = scale * g                                         (running statistics)

Elementwise over ``[P, C]``; ``out`` (strided, e.g. ``G[:, :c]``) is overwritten or accumulated into
(``out += dx``), so a layer's input gradient never exists as a separate ``[P, c]`` tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_pixels, offset, pixel_block, strides4

BLOCK_P = 64
BLOCK_C = 32


@triton.jit
def bn_bwd_apply_kernel(
    g_ptr,          # [P, C] fp32 gradient behind the ReLU
    x_ptr,          # [N, C, H, W] strided BN input
    out_ptr,        # [N, C, H, W] strided output (may alias g's storage only element for element)
    scale_ptr, mean_ptr, invstd_ptr,   # [C] fp32
    dbeta_ptr, dgamma_ptr,             # [C] fp32 complete sums over the P pixels
    inv_npix,                          # 1 / P
    N, H, W, C,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_p, p_mask, n, h, w = pixel_block(tl.program_id(0) * BLOCK_P, BLOCK_P, N, H, W)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = p_mask[:, None] & c_mask[None, :]
    g = tl.load(g_ptr + offs_p[:, None].to(tl.int64) * C + offs_c[None, :], mask=mask, other=0.0)
    sc = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    if BATCH_STATS:
        x = tl.load(x_ptr + offset(n, h, w, sxn, sxh, sxw)[:, None] + offs_c[None, :].to(tl.int64) * sxc,
                    mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
        rs = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0)
        db = tl.load(dbeta_ptr + offs_c, mask=c_mask, other=0.0) * inv_npix
        dg = tl.load(dgamma_ptr + offs_c, mask=c_mask, other=0.0) * inv_npix
        xhat = (x - mu[None, :]) * rs[None, :]
        g = g - db[None, :] - xhat * dg[None, :]
    dx = g * sc[None, :]
    o_ptrs = out_ptr + offset(n, h, w, son, soh, sow)[:, None] + offs_c[None, :].to(tl.int64) * soc
    if ACCUMULATE:
        dx += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, dx.to(out_ptr.dtype.element_ty), mask=mask)


def bn_bwd_apply(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                 invstd: torch.Tensor, dbeta: torch.Tensor, dgamma: torch.Tensor, batch_stats: bool,
                 accumulate: bool) -> torch.Tensor:
    """``out (+)= dx`` of the BN-ReLU backward (see the module docstring). ``g`` ``[P, C]`` fp32 (NHW pixel
    order), ``x``/``out`` ``[N, C, H, W]`` strided. ``out`` may be ``g`` viewed as NHWC (in-place)."""
    n, c, h, w = x.shape
    npix = n * h * w
    check_pixels(npix)
    grid = (triton.cdiv(npix, BLOCK_P), triton.cdiv(c, BLOCK_C))
    bn_bwd_apply_kernel[grid](g, x, out, scale, mean, invstd, dbeta, dgamma, 1.0 / max(npix, 1),
                              n, h, w, c, *strides4(x), *strides4(out),
                              BATCH_STATS=batch_stats, ACCUMULATE=accumulate, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return out
