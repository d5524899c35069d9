"""Conv input gradient (1x1 GEMM, or 3x3 over a staged halo tile) fused with the BN-ReLU backward's reductions.

For ``y = conv(relu(bn(x)), w)`` and the incoming ``gy``: ``gA = conv_transpose(gy, w)`` (the GEMM
``[P, Cout] x [Cout, Cin]`` per tap, taps mirrored), then in the epilogue the ReLU mask and the per-tile partial
sums of the BN backward (:func:`effdense.backends.bn.bn_relu_backward`)::

    g = gA * [(x - mean) * scale + beta > 0], dbeta = sum_p g,   dgamma = sum_p g * (x - mean) * invstd

``g`` is stored (fp32 rows, a transient) for :func:`effdense.kernels.bn_bwd.bn_bwd_apply`, which needs the
complete sums, reduced by :func:`effdense.kernels.bn_bwd.bn_bwd_finalize`. Sums partials are ``[2, T, ldp]``
fp32 (plane 0 ``dbeta``, plane 1 ``dgamma``; the same workspace as :func:`.stats.partials`), one row per tile
of the config that ran.

The 3x3 kernel stages the halo of ``gy`` once per channel chunk, with the dropout mask regenerated from its seed
applied once per element (Philox is the costly part of this prologue), and forms the 9 mirrored tap operands with
``tl.gather`` (see :mod:`.fwd`). DenseNet-BC: ``gy`` has ``k = 12`` channels (``BLOCK_K = 16``), ``gA`` has
``B = 48`` (``BLOCK_N = 64``: one program covers them, so the dropout prologue runs once per element).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (BN, bn_grad_sums, bn_vectors, check_pixels, configs, dot_precision, dropout_scale,
                     grad_rows_times_weight, halo_slots, halo_tile, halo_center, halo_tiles, jit, launch, ld16, pick,
                     pow2, relu_grad, tap)

CONFIGS_1X1 = configs(("BLOCK_P", "BLOCK_N", "BLOCK_K"),
                      [(64, n, k, 4, 2) for n in (16, 32, 64) for k in (16, 32)] + [(64, 128, 32, 8, 2)])
#: 8 warps, 1 stage (the channel loop has one or two iterations: pipelining it only costs registers); with 4
#: warps, or with 64 fp32 output channels, the gathers and the dropout prologue spill (python -m
#: effdense.tools.aot [--no-tf32] [--drop-rate 0.2])
CONFIGS_3X3 = configs(("BH", "BW", "BLOCK_N", "BLOCK_K"),
                      [(bh, 64 // bh, n, k, 8, 1) for bh in (8, 16) for n in (16, 32, 64) for k in (16, 32)])


@triton.jit
def _epilogue(acc, x_ptr, x_ld16, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, g_ptr, g_ld16, sums_ptr, plane,
              ldp, pix, p_mask, offs_n, n_mask, tile, AFFINE: tl.constexpr):
    """ReLU backward of ``acc`` (the gradient of ``relu(bn(x))``) at pixels ``pix``, channels ``offs_n``; store
    ``g`` and the tile's partial sums of ``g`` and ``g * xhat`` into row ``tile``."""
    out_mask = p_mask[:, None] & n_mask[None, :]
    x = tl.load(x_ptr + (pix.to(tl.int64) * (x_ld16 * 16))[:, None] + offs_n[None, :], mask=out_mask,
                other=0.0).to(tl.float32)
    mu, scale, beta, rs = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_n, n_mask, AFFINE)
    g = relu_grad(acc, x, mu, scale, beta, out_mask)
    tl.store(g_ptr + (pix.to(tl.int64) * (g_ld16 * 16))[:, None] + offs_n[None, :], g, mask=out_mask)
    db, dg = bn_grad_sums(g, x, mu, rs, out_mask)
    row = tile.to(tl.int64) * ldp
    tl.store(sums_ptr + row + offs_n, db, mask=n_mask)
    tl.store(sums_ptr + plane + row + offs_n, dg, mask=n_mask)


@jit
def conv1x1_dgrad_kernel(
    gy_ptr,         # [P, ld_gy] rows: gradient of the conv output, channels [0, Cout) (gZ, fp32)
    w_ptr,          # [Cout, Cin] conv weight in its own layout (strides swo, swi), any float dtype
    x_ptr,          # [P, ld_x] rows: the BN input, channels [0, Cin) (F[:, :c]), compute dtype
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x (batch or running statistics)
    g_ptr,          # [P, ld_g] fp32 rows out: gradient behind the ReLU
    sums_ptr,       # [2, T, ldp] fp32 partial sums of g and g * xhat
    P, Cout, Cin, gy_ld16, x_ld16, g_ld16, plane, ldp, swo, swi,
    AFFINE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    cdt = x_ptr.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)     # input channels ci
    n_mask = offs_n < Cin
    gy_ld = gy_ld16 * 16
    g_row = gy_ptr + offs_p.to(tl.int64) * gy_ld
    acc = grad_rows_times_weight(g_row, p_mask, w_ptr, swo, swi, offs_n, n_mask, Cout, cdt, PRECISION, BLOCK_P,
                                 BLOCK_N, BLOCK_K)
    _epilogue(acc, x_ptr, x_ld16, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, g_ptr, g_ld16, sums_ptr, plane, ldp,
              offs_p, p_mask, offs_n, n_mask, pid_p, AFFINE)


@jit
def conv3x3_dgrad_kernel(
    gy_ptr,         # [P, ld_gy] rows: gradient of the conv output, channels [gy_c0, gy_c0 + Cout) (G, fp32)
    w_ptr,          # [Cout, Cin, 3, 3] conv weight in its own layout (strides swo, swi, swh, sww)
    x_ptr,          # [P, ld_x] rows: the BN input, channels [0, Cin) (Z, or F for a plain layer)
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    g_ptr,          # [P, ld_g] fp32 rows out: gradient behind the ReLU
    sums_ptr,       # [2, T, ldp] fp32 partial sums, one row per output tile
    seed_ptr,       # int64 Philox seeds of the forward's dropout (HAS_DROPOUT)
    N, H, W, Cout, Cin, gy_ld16, gy_c0, x_ld16, g_ld16, plane, ldp, seed_idx, drop_p, drop_scale, swo, swi, swh, sww,
    AFFINE: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    cdt = x_ptr.dtype.element_ty
    q_pix, q_valid, o_pix, o_valid = halo_tile(pid, H, W, BH, BW, HALO)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)     # input channels ci
    n_mask = offs_n < Cin
    q_row = gy_ptr + q_pix.to(tl.int64) * (gy_ld16 * 16) + gy_c0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + seed_idx)
    acc = tl.zeros((BH * BW, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cout, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < Cout
        gy = tl.load(q_row[:, None] + offs_k[None, :], mask=q_valid[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:     # the mask the forward drew for these pixels (index p * Cout + c), once per element
            gy = gy * dropout_scale(seed, q_pix, offs_k, Cout, drop_p, drop_scale)
        halo = gy.to(cdt)
        w_k = offs_k[:, None] * swo + offs_n[None, :] * swi      # offsets shared by the taps (few registers)
        w_mask = k_mask[:, None] & n_mask[None, :]
        center = halo_center(tl.cast(k0 < 0, tl.int32), BH, BW, BLOCK_K)
        for t in tl.static_range(9):        # forward y[o] += a[o + d] w[d]  =>  gA[o] += gy[o - d] w[d]
            wt = tl.load(w_ptr + ((t // 3) * swh + (t % 3) * sww) + w_k, mask=w_mask, other=0.0)
            acc = tl.dot(tap(halo, center, 1 - t // 3, 1 - t % 3, BW), wt.to(cdt), acc, input_precision=PRECISION)
    _epilogue(acc, x_ptr, x_ld16, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, g_ptr, g_ld16, sums_ptr, plane, ldp,
              o_pix, o_valid, offs_n, n_mask, pid, AFFINE)


def heuristic_1x1(cout: int, cin: int) -> triton.Config:
    """``BLOCK_K = 16`` where it divides the bottleneck width (48), else 32; ``BLOCK_N`` up to 128 (8 warps)
    over the layer's input channels ``c``."""
    k = 16 if cout % 32 else 32
    if cin >= 128:
        return pick(CONFIGS_1X1, BLOCK_N=128, BLOCK_K=32)
    return pick(CONFIGS_1X1, BLOCK_N=pow2(cin), BLOCK_K=k)


def heuristic_3x3(w: int, cout: int, cin: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """Tiles as the forward's; ``BLOCK_K`` over ``k`` (12 -> 16), ``BLOCK_N`` over the input channels up to
    64 (48 in one program: the dropout prologue once per element), 32 for fp32 operands (registers)."""
    return pick(CONFIGS_3X3, BH=8 if w > 4 else 16, BLOCK_N=pow2(cin, 16, 32 if dtype == torch.float32 else 64),
                BLOCK_K=pow2(cout, 16, 32))


def heuristic(ks: int, n: int, h: int, w: int, cout: int, cin: int, dtype: torch.dtype) -> triton.Config:
    return heuristic_1x1(cout, cin) if ks == 1 else heuristic_3x3(w, cout, cin, dtype)


def tiles(ks: int, n: int, h: int, w: int, config: triton.Config) -> int:
    if ks == 1:
        return triton.cdiv(n * h * w, config.kwargs["BLOCK_P"])
    return halo_tiles(n, h, w, config.kwargs["BH"], config.kwargs["BW"])


def conv_dgrad_bn_relu(gy: torch.Tensor, gy_c0: int, w: torch.Tensor, x: torch.Tensor, bn: BN, g: torch.Tensor,
                       part: torch.Tensor, drop_p: float = 0.0, seeds: torch.Tensor | None = None, seed_idx: int = 0,
                       config: triton.Config | None = None) -> int:
    """For ``y = conv(relu(bn(x[..., :Cin])), w)`` (``w`` ``[Cout, Cin, KS, KS]``) and its gradient
    ``gy[..., gy_c0:gy_c0+Cout]`` (rows buffers; times the dropout mask of ``seeds[seed_idx]`` when
    ``drop_p > 0``, 3x3 only): writes ``g`` (fp32 rows, channels ``[0, Cin)``) and the partial sums
    (``part`` planes 0/1). Returns the rows of partials written."""
    n, h, wd, _ = x.shape
    cout, cin, ks = w.shape[0], w.shape[1], w.shape[-1]
    check_pixels(n * h * wd)
    assert g.dtype == torch.float32 and part.shape[2] >= cin and ks in (1, 3)
    cfg = config or heuristic(ks, n, h, wd, cout, cin, x.dtype)
    t = tiles(ks, n, h, wd, cfg)
    assert part.shape[1] >= t, (part.shape, t)
    grid = (t, triton.cdiv(cin, cfg.kwargs["BLOCK_N"]))
    common = dict(AFFINE=bn.affine, PRECISION=dot_precision(x.dtype))
    if ks == 1:
        assert gy_c0 == 0 and drop_p == 0
        launch(conv1x1_dgrad_kernel, grid, (gy, w, x, *bn.args(), g, part, n * h * wd, cout, cin, ld16(gy), ld16(x),
                                            ld16(g), part.stride(0), part.stride(1), *w.stride()[:2]), cfg,
               **common)
    else:
        launch(conv3x3_dgrad_kernel, grid,
               (gy, w, x, *bn.args(), g, part, bn.mean if seeds is None else seeds, n, h, wd, cout, cin, ld16(gy),
                gy_c0, ld16(x), ld16(g), part.stride(0), part.stride(1), seed_idx, float(drop_p),
                1.0 / (1.0 - drop_p), *w.stride()),
               cfg, HAS_DROPOUT=drop_p > 0, HALO=halo_slots(cfg.kwargs["BH"], cfg.kwargs["BW"]), **common)
    return t
