"""Fused BN-ReLU-Conv forward, 1x1 (GEMM) and 3x3 (implicit GEMM over a staged halo tile), with the output's
Welford partials in the epilogue.

``y = conv_KSxKS(relu((x - mean) * scale + beta), w)`` (stride 1, zero padding applied to the activation *after*
BN-ReLU), optionally dropout, stored into a column range of a rows buffer, and per-tile partials of the
stored values for the next BatchNorm (:func:`effdense.kernels.stats.bn_finalize`). ``scale = gamma * invstd`` is
formed in the prologue from the BN's mean/var/gamma/beta (:func:`~.common.bn_vectors`).

* 1x1 (:func:`conv1x1_fwd_kernel`): ``[P, Cin] x [Cin, Cout]`` per pixel tile; the bottleneck conv1
  (``x = F[:, :c]`` -> ``Z``) and its recomputation in backward.
* 3x3 (:func:`conv3x3_fwd_kernel`): a program owns a ``BH x BW`` tile of output pixels. Per ``BLOCK_K``
  channel chunk it loads the ``(BH+2) x (BW+2)`` halo tile *once*, applies BN-ReLU *once* (zero outside the
  image: that is the padding), and forms each of the 9 tap operands from that staged tile with ``tl.gather``
  (Triton's only way to re-index a register/shared tile: it lowers to warp shuffles or a shared-memory
  gather, never to global memory). The alternative Triton allows without gather, one shifted global load and
  BN-ReLU per tap, reloads and renormalizes every element 9 times; a 1-D pixel strip with a flat halo would
  need ``2W + 2`` halo rows per strip (a 2x-4x larger tile than 8x8's 100-of-128 slots for CIFAR widths).
  Tile sizes fit DenseNet-BC: ``B = bn_size * k = 48`` input channels run as three exact ``BLOCK_K = 16``
  chunks (no masked columns), ``k = 12`` output channels as ``BLOCK_N = 16``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (BN, bn_relu_tile, bn_vectors, check_pixels, configs, dot_precision, dropout_scale, halo_slots,
                     fma_dots, halo_center, halo_tile, halo_tiles, jit, launch, ld16, pick, pow2, store_tile_stats, tap)

#: tensor-core dots: 2 stages; FMA dots (exact fp32, :func:`~.common.fma_dots`): 1 stage, K <= 32
CONFIGS_1X1 = configs(("BLOCK_P", "BLOCK_N", "BLOCK_K"),
                      [(64, n, k, 4, 2) for n in (16, 32, 64) for k in (16, 32, 64)]
                      + [(128, n, 64, 8, 2) for n in (32, 64)]
                      + [(64, n, k, 4, 1) for n in (16, 32, 64) for k in (16, 32)])
CONFIGS_3X3 = configs(("BH", "BW", "BLOCK_N", "BLOCK_K"),
                      [(bh, 64 // bh, n, k, 4, s) for bh in (8, 16) for n in (16, 32, 64) for k in (16, 32)
                       for s in (2, 1)])


@jit
def conv1x1_fwd_kernel(
    x_ptr,          # [P, ld_x] rows: input channels [0, Cin) (F or Z), compute dtype
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x (batch or running statistics)
    w_ptr,          # [Cout, Cin] conv weight in its own layout (strides swo, swi), any float dtype
    y_ptr,          # [P, ld_y] rows: output channels [0, Cout)
    stats_ptr,      # [4, T, ldp] fp32 Welford partials of y (STATS)
    P, Cin, Cout, x_ld16, y_ld16, plane, ldp, swo, swi,
    AFFINE: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    cdt = x_ptr.dtype.element_ty
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    x_ld = x_ld16 * 16
    x_row = x_ptr + offs_p.to(tl.int64) * x_ld
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cin, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < Cin
        # whole padded rows are loaded (vector loads); columns past Cin are dropped by the BN-ReLU's where
        x = tl.load(x_row[:, None] + offs_k[None, :], mask=p_mask[:, None] & (offs_k < x_ld)[None, :], other=0.0)
        mu, scale, beta, _ = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_k, k_mask, AFFINE)
        a = bn_relu_tile(x, mu, scale, beta, p_mask[:, None] & k_mask[None, :])
        wt = tl.load(w_ptr + offs_n[None, :] * swo + offs_k[:, None] * swi, mask=k_mask[:, None] & n_mask[None, :],
                     other=0.0)
        acc = tl.dot(a.to(cdt), wt.to(cdt), acc, input_precision=PRECISION)
    out_mask = p_mask[:, None] & n_mask[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (offs_p.to(tl.int64) * (y_ld16 * 16))[:, None] + offs_n[None, :], y, mask=out_mask)
    if STATS:   # statistics of the values as stored (rounded to y's dtype), as nn.BatchNorm2d would see them
        store_tile_stats(y.to(tl.float32), p_mask, out_mask, offs_n, n_mask, pid_p, stats_ptr, plane, ldp,
                         pid_n == 0)


@jit
def conv3x3_fwd_kernel(
    x_ptr,          # [P, ld_x] rows: input channels [0, Cin) (Z, or F for a plain layer), compute dtype
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    w_ptr,          # [Cout, Cin, 3, 3] conv weight in its own layout (strides swo, swi, swh, sww), any float dtype
    y_ptr,          # [P, ld_y] rows: output channels [y_c0, y_c0 + Cout) (F[:, c:c+k])
    stats_ptr,      # [4, T, ldp] fp32 Welford partials of y, one row per output tile (STATS)
    seed_ptr,       # [>= seed_idx + 1] int64 Philox seeds (HAS_DROPOUT): a device tensor, no host sync
    N, H, W, Cin, Cout, x_ld16, y_ld16, y_c0, plane, ldp, seed_idx, drop_p, drop_scale, swo, swi, swh, sww,
    AFFINE: tl.constexpr, HAS_DROPOUT: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    cdt = x_ptr.dtype.element_ty
    q_pix, q_valid, o_pix, o_valid = halo_tile(pid, H, W, BH, BW, HALO)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    x_ld = x_ld16 * 16
    q_row = x_ptr + q_pix.to(tl.int64) * x_ld
    acc = tl.zeros((BH * BW, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cin, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < Cin
        x = tl.load(q_row[:, None] + offs_k[None, :], mask=q_valid[:, None] & (offs_k < x_ld)[None, :], other=0.0)
        mu, scale, beta, _ = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_k, k_mask, AFFINE)
        halo = bn_relu_tile(x, mu, scale, beta, q_valid[:, None] & k_mask[None, :]).to(cdt)    # once per chunk
        w_k = offs_n[None, :] * swo + offs_k[:, None] * swi      # offsets shared by the taps (few registers)
        w_mask = k_mask[:, None] & n_mask[None, :]
        center = halo_center(tl.cast(k0 < 0, tl.int32), BH, BW, BLOCK_K)
        for t in tl.static_range(9):        # y[o] += a[o + d_t] w_t: the 9 taps from the staged tile
            wt = tl.load(w_ptr + ((t // 3) * swh + (t % 3) * sww) + w_k, mask=w_mask, other=0.0)
            acc = tl.dot(tap(halo, center, t // 3 - 1, t % 3 - 1, BW), wt.to(cdt), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = acc * dropout_scale(tl.load(seed_ptr + seed_idx), o_pix, offs_n, Cout, drop_p, drop_scale)
    out_mask = o_valid[:, None] & n_mask[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (o_pix.to(tl.int64) * (y_ld16 * 16) + y_c0)[:, None] + offs_n[None, :], y, mask=out_mask)
    if STATS:
        store_tile_stats(y.to(tl.float32), o_valid, out_mask, offs_n, n_mask, pid, stats_ptr, plane, ldp,
                         pid_n == 0)


def heuristic_1x1(npix: int, cin: int, cout: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """``BLOCK_N`` covers ``Cout`` in one tile up to 64 (bottleneck widths 48/64: the BN-ReLU prologue then runs
    once per input element), ``BLOCK_K`` up to 64 (32 for FMA dots, :func:`~.common.fma_dots`); 128-pixel tiles
    with 8 warps once there are enough pixels to fill a GPU twice over with them (``P >= 32768``)."""
    fma = fma_dots(dtype)
    n, k = pow2(cout), pow2(cin, 16, 32 if fma else 64)
    if npix >= 32768 and n >= 32 and k == 64:
        return pick(CONFIGS_1X1, BLOCK_P=128, BLOCK_N=n, BLOCK_K=64)
    return pick(CONFIGS_1X1, num_stages=1 if fma else 2, BLOCK_P=64, BLOCK_N=n, BLOCK_K=k)


def heuristic_3x3(w: int, cin: int, cout: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """8x8 output tiles (halo 10x10 in 128 slots), 16x4 for images at most 4 wide; ``BLOCK_N`` covers
    ``Cout`` (k = 12 -> 16); ``BLOCK_K = 16`` up to 64 input channels (48 = 3 exact chunks), else 32; one stage
    for FMA dots."""
    return pick(CONFIGS_3X3, num_stages=1 if fma_dots(dtype) else 2, BH=8 if w > 4 else 16, BLOCK_N=pow2(cout),
                BLOCK_K=16 if cin <= 64 else 32)


def tiles(ks: int, n: int, h: int, w: int, config: triton.Config) -> int:
    """Partial rows (tiles) a forward launch with ``config`` writes."""
    if ks == 1:
        return triton.cdiv(n * h * w, config.kwargs["BLOCK_P"])
    return halo_tiles(n, h, w, config.kwargs["BH"], config.kwargs["BW"])


def heuristic(ks: int, n: int, h: int, w: int, cin: int, cout: int, dtype: torch.dtype) -> triton.Config:
    return heuristic_1x1(n * h * w, cin, cout, dtype) if ks == 1 else heuristic_3x3(w, cin, cout, dtype)


def bn_relu_conv_fwd(x: torch.Tensor, cin: int, bn: BN, w: torch.Tensor, out: torch.Tensor, out_c0: int = 0,
                     part: torch.Tensor | None = None, drop_p: float = 0.0, seeds: torch.Tensor | None = None,
                     seed_idx: int = 0, config: triton.Config | None = None) -> int:
    """``out[..., out_c0:out_c0+Cout] = dropout(conv(relu(bn(x[..., :cin])), w))`` on rows buffers ``x``/``out``
    ``[N, H, W, ld]``, ``w`` ``[Cout, cin, KS, KS]`` (KS 1 or 3, 'same' padding). With ``part``, writes the
    Welford partials of the stored output and returns how many tiles (rows) it wrote. ``drop_p > 0``: dropout
    with the Philox seed ``seeds[seed_idx]`` (3x3 only). The 1x1 writes channels from 0."""
    n, h, wd, _ = x.shape
    cout, ks = w.shape[0], w.shape[-1]
    assert w.shape[1] == cin and out.shape[:3] == x.shape[:3] and ks in (1, 3), (x.shape, w.shape, out.shape)
    npix = n * h * wd
    check_pixels(npix)
    cfg = config or heuristic(ks, n, h, wd, cin, cout, x.dtype)
    t = tiles(ks, n, h, wd, cfg)
    plane, ldp = (part.stride(0), part.stride(1)) if part is not None else (0, 0)
    if part is not None:
        assert part.shape[1] >= t and part.shape[2] >= cout, (part.shape, t, cout)
    stats = part if part is not None else bn.mean      # stand-ins for unused pointers: an fp32 vector
    common = dict(AFFINE=bn.affine, STATS=part is not None, PRECISION=dot_precision(x.dtype))
    if ks == 1:
        assert out_c0 == 0 and drop_p == 0
        launch(conv1x1_fwd_kernel, (t, triton.cdiv(cout, cfg.kwargs["BLOCK_N"])),
               (x, *bn.args(), w, out, stats, npix, cin, cout, ld16(x), ld16(out), plane, ldp, *w.stride()[:2]), cfg,
               **common)
    else:
        assert drop_p == 0 or seeds is not None
        launch(conv3x3_fwd_kernel, (t, triton.cdiv(cout, cfg.kwargs["BLOCK_N"])),
               (x, *bn.args(), w, out, stats, bn.mean if seeds is None else seeds, n, h, wd, cin, cout, ld16(x),
                ld16(out), out_c0, plane, ldp, seed_idx, float(drop_p), 1.0 / (1.0 - drop_p), *w.stride()),
               cfg, HAS_DROPOUT=drop_p > 0, HALO=halo_slots(cfg.kwargs["BH"], cfg.kwargs["BW"]), **common)
    return t
