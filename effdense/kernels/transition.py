"""The DenseNet transition ``conv1x1(avgpool2x2(relu(bn(x))))`` on fused kernels, forward and backward.

``nn.AvgPool2d(2, 2)`` (floor mode: an odd last row/column is dropped) and the 1x1 conv are both linear and act
on different axes, so pooling first is exact; the GEMM then runs over the ``Po = N * (H//2) * (W//2)`` pooled
pixels: ``y[Po, Cout] = a[Po, Cin] @ w[Cin, Cout]`` with ``a[po] = 1/4 * sum_{window} relu(bn(x[p]))``.
Inputs and outputs are rows buffers (:mod:`.common`), the weight is read in its own ``[Cout, Cin, 1, 1]`` layout.

Forward (:func:`transition_fwd`)
  BN-ReLU of the four pixels of each window and their average in the GEMM prologue (neither the BN-ReLU
  output nor the pooled map is ever stored), fp32 accumulation, store into a rows buffer.
Backward
  * :func:`transition_dgrad`: ``gP = gY @ w`` (``[Po, Cout] x [Cout, Cin]``); in the epilogue each full-res
    pixel of a window gets ``gP / 4`` masked by its own ReLU, stored as ``g`` (fp32 rows; the row and column an
    odd size makes the floor crop get ``g = 0``, written by the last windows), with the per-tile partial sums
    ``dbeta = sum g``, ``dgamma = sum g * xhat`` over every pixel.
  * :func:`transition_wgrad`: ``dw = gY^T @ a`` with the pooled BN-ReLU ``a`` recomputed in the prologue,
    split over the pixels like :mod:`.wgrad`; both reduced by :func:`~.bn_bwd.bn_bwd_finalize`.

NaN and Inf: the BatchNorm sees every pixel, the cropped ones too, and PyTorch's BN backward sums ``g * xhat``
over all of them, ``0 * NaN = NaN`` included; so dgrad visits the cropped row and column as well (odd sizes only),
writes their ``g = 0`` and adds their ``0 * xhat`` to ``dgamma``. (The convolution, after the pool as in
``effdense.models.Transition``, never sees them.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (BN, bn_grad_sums, bn_relu_tile, bn_vectors, check_pixels, configs, dot_precision, fma_dots,
                     grad_rows_times_weight, jit, launch, ld16, pick, pow2, relu_grad)
from .wgrad import split

FWD_CONFIGS = configs(("BLOCK_P", "BLOCK_N", "BLOCK_K"), [(64, n, k, 4, 2) for n in (16, 32, 64) for k in (16, 32)])
#: 8 warps for 64 channels: the epilogue holds the pooled gradient, a pixel's x and g tiles and their addresses
#: (4 warps: 255 registers and 56 bytes of spills in bf16 under Triton 3.9, 288 under 3.6; python -m
#: effdense.tools.aot)
DGRAD_CONFIGS = configs(("BLOCK_P", "BLOCK_N", "BLOCK_K"), [(64, n, k, 8 if n == 64 else 4, 2) for n in (16, 32, 64)
                                                            for k in (16, 32)])
WGRAD_CONFIGS = configs(("BLOCK_CO", "BLOCK_CI", "BLOCK_P"), [(co, ci, 64, 4, 2) for co in (16, 32, 64)
                                                               for ci in (16, 32)])


@triton.jit
def pooled_bn_relu(x_ptr, x_ld, corner, p_mask, offs_k, mu, scale, beta, k_mask, W):
    """``avgpool2x2(relu((x - mu) * scale + beta))`` of the windows whose top-left full-res pixels are ``corner``:
    a ``[rows, K]`` fp32 tile (zero outside ``p_mask``/``k_mask``), the A operand of the transition's GEMMs.

    The four pixels of a window are one pointer tile plus a scalar offset each; a runtime loop over them keeps
    one pixel's loads live at a time (unrolled, the compiler hoists all four and spills)."""
    mask = p_mask[:, None] & k_mask[None, :]
    ld_mask = p_mask[:, None] & (offs_k < x_ld)[None, :]
    ptrs = x_ptr + (corner.to(tl.int64) * x_ld)[:, None] + offs_k[None, :]
    a = bn_relu_tile(tl.load(ptrs, mask=ld_mask, other=0.0), mu, scale, beta, mask)
    for d in range(1, 4):
        x = tl.load(ptrs + ((d // 2) * W + d % 2).to(tl.int64) * x_ld, mask=ld_mask, other=0.0)
        a += bn_relu_tile(x, mu, scale, beta, mask)
    return a * 0.25


@triton.jit
def _windows(offs_p, Ho, Wo, H, W):
    """Top-left full-res pixel of each pooled pixel ``offs_p`` over ``[N, Ho, Wo]``."""
    hw = Ho * Wo
    n = offs_p // hw
    r = offs_p - n * hw
    ho = r // Wo
    return (n * H + 2 * ho) * W + 2 * (r - ho * Wo)


@triton.jit
def _neighbour(d):
    """Row and column, in the 3x3 pixels from a window's top-left one, of the window's pixels (``d`` 0..3), then of
    the five that a floor-mode pool crops next to the last windows of an odd-sized map (``d`` 4..8)."""
    e = d - 4
    return tl.where(d < 4, d // 2, tl.where(e < 3, 2, e - 3)), tl.where(d < 4, d % 2, tl.where(e < 3, e, 2))


@triton.jit
def _last_windows(offs_p, Ho, Wo, H, W):
    """1 where a pooled pixel ``offs_p`` is in the last pooled row of an odd-height map, else 0; the same for the
    last pooled column of an odd-width one (its window then borders the row/column the pool crops): the rows and
    columns ``< 2 + last`` of :func:`_neighbour` are the pixels it owns."""
    r = offs_p % (Ho * Wo)
    return ((r // Wo == Ho - 1) & (H % 2 == 1)).to(tl.int32), ((r % Wo == Wo - 1) & (W % 2 == 1)).to(tl.int32)


@jit
def transition_fwd_kernel(
    x_ptr,          # [P, ld_x] rows: the BN input (the block's output F), compute dtype
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    w_ptr,          # [Cout, Cin] conv weight in its own layout (strides swo, swi), any float dtype
    y_ptr,          # [Po, ld_y] rows out, Po = N * (H//2) * (W//2)
    N, H, W, Ho, Wo, Cin, Cout, x_ld16, y_ld16, swo, swi,
    AFFINE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cdt = x_ptr.dtype.element_ty
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N * Ho * Wo
    corner = _windows(offs_p, Ho, Wo, H, W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cin, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < Cin
        mu, sc, be, _ = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_k, k_mask, AFFINE)
        a = pooled_bn_relu(x_ptr, x_ld16 * 16, corner, p_mask, offs_k, mu, sc, be, k_mask, W)
        wt = tl.load(w_ptr + offs_n[None, :] * swo + offs_k[:, None] * swi, mask=k_mask[:, None] & n_mask[None, :],
                     other=0.0)
        acc = tl.dot(a.to(cdt), wt.to(cdt), acc, input_precision=PRECISION)
    tl.store(y_ptr + (offs_p.to(tl.int64) * (y_ld16 * 16))[:, None] + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & n_mask[None, :])


@jit
def transition_dgrad_kernel(
    gy_ptr,         # [Po, ld_gy] rows: gradient of the transition output, any float dtype
    w_ptr,          # [Cout, Cin] conv weight in its own layout (strides swo, swi)
    x_ptr,          # [P, ld_x] rows: the BN input
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    g_ptr,          # [P, ld_g] fp32 rows out: gradient behind the ReLU (every pixel, cropped ones 0)
    sums_ptr,       # [2, T, ldp] fp32 partial sums of g and g * xhat, one row per pooled tile
    N, H, W, Ho, Wo, Cout, Cin, gy_ld16, x_ld16, g_ld16, plane, ldp, swo, swi,
    AFFINE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    cdt = x_ptr.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N * Ho * Wo
    corner = _windows(offs_p, Ho, Wo, H, W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)     # input channels ci
    n_mask = offs_n < Cin
    g_row = gy_ptr + offs_p.to(tl.int64) * (gy_ld16 * 16)
    acc = grad_rows_times_weight(g_row, p_mask, w_ptr, swo, swi, offs_n, n_mask, Cout, cdt, PRECISION, BLOCK_P,
                                 BLOCK_N, BLOCK_K)
    # epilogue: the pool's backward (gP / 4 to each pixel of the window), ReLU backward, BN backward's sums
    gq = acc * 0.25
    out_mask = p_mask[:, None] & n_mask[None, :]
    mu, sc, be, rs = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_n, n_mask, AFFINE)
    last_h, last_w = _last_windows(offs_p, Ho, Wo, H, W)
    x_ld = x_ld16 * 16
    g_ld = g_ld16 * 16
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the window's 4 pixels, then (odd H or W) the 5 the floor-mode pool crops next to the last windows: their g
    # is 0 and is written, and they add 0 * xhat to the sums as in PyTorch's (NaN where x is not finite). A
    # runtime loop with the pointers formed inside it: one pixel's loads and addresses live at a time
    for d in range(0, 4 + 5 * ((H | W) & 1)):
        i, j = _neighbour(d)
        take = out_mask & (i < 2 + last_h)[:, None] & (j < 2 + last_w)[:, None]
        pix = (corner + i * W + j).to(tl.int64)
        x = tl.load(x_ptr + (pix * x_ld)[:, None] + offs_n[None, :], mask=take, other=0.0)
        g = relu_grad(gq, x, mu, sc, be, take & (d < 4))
        tl.store(g_ptr + (pix * g_ld)[:, None] + offs_n[None, :], g, mask=take)
        db_d, dg_d = bn_grad_sums(g, x, mu, rs, take)
        db += db_d
        dg += dg_d
    row = pid_p.to(tl.int64) * ldp
    tl.store(sums_ptr + row + offs_n, db, mask=n_mask)
    tl.store(sums_ptr + plane + row + offs_n, dg, mask=n_mask)


@jit
def transition_wgrad_kernel(
    gy_ptr,         # [Po, ld_gy] rows: gradient of the transition output
    x_ptr,          # [P, ld_x] rows: the BN input
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    dw_ptr,         # [S, Cout * Cin] fp32 partial weight gradients
    N, H, W, Ho, Wo, Cout, Cin, gy_ld16, x_ld16, tiles_per_split,
    AFFINE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    cdt = x_ptr.dtype.element_ty
    offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < Cout
    offs_ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < Cin
    split = tl.program_id(2)
    mu, sc, be, _ = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_ci, ci_mask, AFFINE)
    npo = N * Ho * Wo
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(npo, BLOCK_P))):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < npo
        gy = tl.load(gy_ptr + offs_p.to(tl.int64)[None, :] * (gy_ld16 * 16) + offs_co[:, None],
                     mask=co_mask[:, None] & p_mask[None, :], other=0.0)        # [BLOCK_CO, BLOCK_P]
        a = pooled_bn_relu(x_ptr, x_ld16 * 16, _windows(offs_p, Ho, Wo, H, W), p_mask, offs_ci, mu, sc, be, ci_mask, W)
        acc = tl.dot(gy.to(cdt), a.to(cdt), acc, input_precision=PRECISION)
    tl.store(dw_ptr + split.to(tl.int64) * Cout * Cin + offs_co[:, None] * Cin + offs_ci[None, :], acc,
             mask=co_mask[:, None] & ci_mask[None, :])


def fwd_heuristic(cin: int, cout: int) -> triton.Config:
    return pick(FWD_CONFIGS, BLOCK_N=pow2(cout), BLOCK_K=pow2(cin, 16, 32))


def dgrad_heuristic(cout: int, cin: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """``BLOCK_N`` over the input channels (up to 64, then 8 warps), ``BLOCK_K`` over the output channels up to 32,
    16 for FMA dots (:func:`~.common.fma_dots`: 32 spills at 4 or 8 warps)."""
    return pick(DGRAD_CONFIGS, BLOCK_N=pow2(cin), BLOCK_K=pow2(cout, 16, 16 if fma_dots(dtype) else 32))


def wgrad_heuristic(cout: int, cin: int) -> triton.Config:
    return pick(WGRAD_CONFIGS, BLOCK_CO=pow2(cout), BLOCK_CI=pow2(cin, 16, 32))


def _pooled(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """``(N, H, W, Ho, Wo, Po)`` of the 2x2 floor-mode pooling of the rows buffer ``x``."""
    n, h, w, _ = x.shape
    check_pixels(n * h * w)
    return n, h, w, h // 2, w // 2, n * (h // 2) * (w // 2)


def transition_fwd(x: torch.Tensor, cin: int, bn: BN, w: torch.Tensor, out: torch.Tensor,
                   config: triton.Config | None = None) -> None:
    """``out[..., :Cout] = conv1x1(avgpool2x2(relu(bn(x[..., :cin]))), w)`` on rows buffers ``x``
    ``[N, H, W, ld]`` and ``out`` ``[N, H//2, W//2, ld']``; ``w`` ``[Cout, cin, 1, 1]``."""
    n, h, wd, ho, wo, npo = _pooled(x)
    cout = w.shape[0]
    assert w.shape[1] == cin and out.shape[:3] == (n, ho, wo), (x.shape, w.shape, out.shape)
    cfg = config or fwd_heuristic(cin, cout)
    launch(transition_fwd_kernel, (triton.cdiv(npo, cfg.kwargs["BLOCK_P"]), triton.cdiv(cout, cfg.kwargs["BLOCK_N"])),
           (x, *bn.args(), w, out, n, h, wd, ho, wo, cin, cout, ld16(x), ld16(out), *w.stride()[:2]), cfg,
           AFFINE=bn.affine, PRECISION=dot_precision(x.dtype))


def dgrad_tiles(x: torch.Tensor, config: triton.Config) -> int:
    return triton.cdiv(_pooled(x)[-1], config.kwargs["BLOCK_P"])


def transition_dgrad(gy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, bn: BN, g: torch.Tensor,
                     part: torch.Tensor, config: triton.Config | None = None) -> int:
    """For the transition's output gradient ``gy`` (rows ``[N, H//2, W//2, ld]``, channels ``[0, Cout)``): writes
    ``g`` (fp32 rows, every full-resolution pixel) and the partial sums of the BN backward into
    ``part``; returns the rows of partials written."""
    n, h, wd, ho, wo, npo = _pooled(x)
    cout, cin = w.shape[0], w.shape[1]
    cfg = config or dgrad_heuristic(cout, cin, x.dtype)
    t = dgrad_tiles(x, cfg)
    assert part.shape[1] >= t and part.shape[2] >= cin and g.dtype == torch.float32
    launch(transition_dgrad_kernel, (t, triton.cdiv(cin, cfg.kwargs["BLOCK_N"])),
           (gy, w, x, *bn.args(), g, part, n, h, wd, ho, wo, cout, cin, ld16(gy), ld16(x), ld16(g), part.stride(0),
            part.stride(1), *w.stride()[:2]), cfg, AFFINE=bn.affine, PRECISION=dot_precision(x.dtype))
    return t


def wgrad_plan(x: torch.Tensor, cin: int, cout: int, config: triton.Config | None = None) -> tuple:
    """``(config, S)`` of :func:`transition_wgrad` for the rows buffer ``x`` (S from the SM count)."""
    cfg = config or wgrad_heuristic(cout, cin)
    kw = cfg.kwargs
    n_tiles = triton.cdiv(_pooled(x)[-1], kw["BLOCK_P"])
    return cfg, split(n_tiles, triton.cdiv(cout, kw["BLOCK_CO"]) * triton.cdiv(cin, kw["BLOCK_CI"]), x.device)[0]


def transition_wgrad(gy: torch.Tensor, x: torch.Tensor, cin: int, bn: BN, cout: int, part: torch.Tensor | None = None,
                     config: triton.Config | None = None, splits: int | None = None) -> tuple[torch.Tensor, int]:
    """Partial weight gradients ``[S, Cout * cin]`` (fp32; sum over the first axis for ``dw``) of the transition
    for its output gradient ``gy`` (rows), into ``part`` (flat, at least ``S * Cout * cin``) or a new tensor;
    the pooled BN-ReLU of ``x`` is recomputed in the prologue. ``splits`` overrides ``S``. Returns
    ``(partials, S)``."""
    n, h, wd, ho, wo, npo = _pooled(x)
    cfg, s = wgrad_plan(x, cin, cout, config)
    s = s if splits is None else splits
    kw = cfg.kwargs
    blocks = (triton.cdiv(cout, kw["BLOCK_CO"]), triton.cdiv(cin, kw["BLOCK_CI"]))
    per = triton.cdiv(triton.cdiv(npo, kw["BLOCK_P"]), s)
    out = torch.empty(s * cout * cin, dtype=torch.float32, device=x.device) if part is None else part
    assert out.numel() >= s * cout * cin and out.dtype == torch.float32
    launch(transition_wgrad_kernel, (*blocks, s),
           (gy, x, *bn.args(), out, n, h, wd, ho, wo, cout, cin, ld16(gy), ld16(x), per), cfg,
           AFFINE=bn.affine, PRECISION=dot_precision(x.dtype))
    return out[:s * cout * cin].view(s, cout * cin), s
