"""Conv weight gradient (1x1, or 3x3 over a staged halo tile) with the BN-ReLU activation recomputed in the prologue.

``dw[co, ci, tap] = sum_p gy[p, co] * relu(bn(x)[p + d_tap, ci])`` (zero padding on the activation):
a GEMM ``[Cout, P] x [P, Cin]`` per tap whose reduction runs over the ``P`` pixels.

The pixel reduction is split over ``S`` programs (per channel block), each summing a contiguous range of pixel
tiles into fp32 partials ``[S, Cout * Cin * KS * KS]`` (every row written, programs with no tiles write zeros),
summed afterwards in a fixed order by :func:`effdense.kernels.bn_bwd.bn_bwd_finalize` (deterministic, unlike
atomics). DenseNet weight gradients are small while ``P`` is large, so the split is where the parallelism is:
``S`` is sized from the device's SM count (:func:`split`: about two programs per SM).

The 3x3 kernel stages the ``(BH+2) x (BW+2)`` halo of BN-ReLU(x) once per pixel tile and feeds the taps of one
tap row from it (``tl.gather``, see :mod:`.fwd`) into 3 accumulators; ``gy`` (with the dropout mask regenerated)
is loaded once per tile for those taps. Three programs per channel block (one per tap row) stage the halo three
times, not nine; one program for all nine taps would spill (9 accumulators + the gathers' operands).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (BN, bn_relu_tile, bn_vectors, check_pixels, configs, dot_precision, dropout_scale, fma_dots,
                     halo_slots, halo_center, halo_tile, halo_tiles, jit, launch, ld16, pick, pow2, sm_count, tap)

#: the pixel (reduction) tile is the dots' K: 64 for tensor cores; 16 with 8 warps for FMA dots (exact fp32:
#: each thread holds a K slice of both operands; 64 spills kilobytes, python -m effdense.tools.aot --no-tf32)
CONFIGS_1X1 = configs(("BLOCK_CO", "BLOCK_CI", "BLOCK_P"),
                      [(co, ci, p, w, 2) for co in (16, 32, 64) for ci in (16, 32, 64) for p, w in ((64, 4), (16, 8))])
CONFIGS_3X3 = configs(("BH", "BW", "BLOCK_CO", "BLOCK_CI"),
                      [(bh, 64 // bh, co, ci, w, 2) for bh in (8, 16) for co in (16, 32) for ci in (16, 32)
                       for w in (4, 8)])
#: programs per SM the split aims at
WAVES = 2


@jit
def conv1x1_wgrad_kernel(
    gy_ptr,         # [P, ld_gy] rows: gradient of the conv output, channels [0, Cout) (gZ, fp32)
    x_ptr,          # [P, ld_x] rows: the BN input, channels [0, Cin) (F[:, :c]), compute dtype
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    dw_ptr,         # [S, Cout * Cin] fp32 partial weight gradients
    P, Cout, Cin, gy_ld16, x_ld16, tiles_per_split,
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
    gy_ld = gy_ld16 * 16
    x_ld = x_ld16 * 16
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(P, BLOCK_P))
    for tile in range(first, last):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        rows = offs_p.to(tl.int64)
        gy = tl.load(gy_ptr + rows[None, :] * gy_ld + offs_co[:, None], mask=co_mask[:, None] & p_mask[None, :],
                     other=0.0)                                       # [BLOCK_CO, BLOCK_P]
        a_mask = p_mask[:, None] & ci_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_ld + offs_ci[None, :], mask=p_mask[:, None] & (offs_ci < x_ld)[None, :],
                    other=0.0)                                        # [BLOCK_P, BLOCK_CI]
        a = bn_relu_tile(x, mu, sc, be, a_mask)
        acc = tl.dot(gy.to(cdt), a.to(cdt), acc, input_precision=PRECISION)
    tl.store(dw_ptr + split.to(tl.int64) * Cout * Cin + offs_co[:, None] * Cin + offs_ci[None, :], acc,
             mask=co_mask[:, None] & ci_mask[None, :])


@triton.jit
def _tap(acc, gy, halo, center, o_valid, dh, dw: tl.constexpr, BW: tl.constexpr, PRECISION: tl.constexpr):
    """One tap's ``acc += gy^T-tile @ a[o + d]`` with the tap operand gathered from the staged halo. Rows of
    output pixels outside the image are zeroed in the operand as well as in ``gy``: the image pixel next to one
    may hold a NaN or Inf activation, and ``0 * NaN`` would add a term PyTorch's weight gradient does not have."""
    a = tl.where(o_valid[:, None], tap(halo, center, dh, dw, BW), 0.0)
    return tl.dot(gy, a.to(gy.dtype), acc, input_precision=PRECISION)


@triton.jit
def _store_tap(dw_ptr, base, acc, t, offs_co, offs_ci, Cin, mask):
    tl.store(dw_ptr + base + (offs_co[:, None] * Cin + offs_ci[None, :]) * 9 + t, acc, mask=mask)


@jit
def conv3x3_wgrad_kernel(
    gy_ptr,         # [P, ld_gy] rows: gradient of the conv output, channels [gy_c0, gy_c0 + Cout) (G, fp32)
    x_ptr,          # [P, ld_x] rows: the BN input, channels [0, Cin) (Z, or F for a plain layer)
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [Cin] BN of x
    dw_ptr,         # [S, Cout * Cin * 9] fp32 partial weight gradients
    seed_ptr,       # int64 Philox seeds of the forward's dropout (HAS_DROPOUT)
    N, H, W, Cout, Cin, gy_ld16, gy_c0, x_ld16, tiles_per_split, seed_idx, drop_p, drop_scale,
    AFFINE: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, HALO: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    # grid: (Cout blocks, Cin blocks * 3 tap rows, splits). A program owns one row of taps (dh fixed, dw =
    # -1, 0, 1): three accumulators. All nine in one program would stage the halo once instead of three times,
    # but 9 accumulators plus the gathers' operands spill in fp32 even at 8 warps (python -m effdense.tools.aot).
    cdt = x_ptr.dtype.element_ty
    offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < Cout
    offs_ci = (tl.program_id(1) // 3) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < Cin
    dh = tl.program_id(1) % 3 - 1
    split = tl.program_id(2)
    mu, sc, be, _ = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_ci, ci_mask, AFFINE)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr + seed_idx)
    gy_ld = gy_ld16 * 16
    x_ld = x_ld16 * 16
    acc0 = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)
    acc2 = tl.zeros_like(acc0)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, N * tl.cdiv(H, BH) * tl.cdiv(W, BW))
    for tile in range(first, last):
        q_pix, q_valid, o_pix, o_valid = halo_tile(tile, H, W, BH, BW, HALO)
        gy = tl.load(gy_ptr + gy_c0 + o_pix.to(tl.int64)[None, :] * gy_ld + offs_co[:, None],
                     mask=co_mask[:, None] & o_valid[None, :], other=0.0)       # [BLOCK_CO, BH*BW]
        if HAS_DROPOUT:
            gy = gy * tl.trans(dropout_scale(seed, o_pix, offs_co, Cout, drop_p, drop_scale))
        gy = gy.to(cdt)
        x = tl.load(x_ptr + q_pix.to(tl.int64)[:, None] * x_ld + offs_ci[None, :],
                    mask=q_valid[:, None] & (offs_ci < x_ld)[None, :], other=0.0)
        halo = bn_relu_tile(x, mu, sc, be, q_valid[:, None] & ci_mask[None, :]).to(cdt)     # once per tile
        center = halo_center(tl.cast(tile < 0, tl.int32), BH, BW, BLOCK_CI)
        acc0 = _tap(acc0, gy, halo, center, o_valid, dh, -1, BW, PRECISION)
        acc1 = _tap(acc1, gy, halo, center, o_valid, dh, 0, BW, PRECISION)
        acc2 = _tap(acc2, gy, halo, center, o_valid, dh, 1, BW, PRECISION)
    base = split.to(tl.int64) * Cout * Cin * 9
    mask = co_mask[:, None] & ci_mask[None, :]
    _store_tap(dw_ptr, base, acc0, 3 * dh + 3, offs_co, offs_ci, Cin, mask)
    _store_tap(dw_ptr, base, acc1, 3 * dh + 4, offs_co, offs_ci, Cin, mask)
    _store_tap(dw_ptr, base, acc2, 3 * dh + 5, offs_co, offs_ci, Cin, mask)


def heuristic_1x1(cout: int, cin: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """``BLOCK_CO`` covers the bottleneck width (48 -> 64: the BN-ReLU recomputation of ``x`` runs once per
    element instead of once per output block), ``BLOCK_CI`` up to 64; 16-pixel K tiles for FMA dots."""
    p = 16 if fma_dots(dtype) else 64
    return pick(CONFIGS_1X1, BLOCK_CO=pow2(cout), BLOCK_CI=pow2(cin), BLOCK_P=p)


def heuristic_3x3(w: int, cout: int, cin: int, dtype: torch.dtype = torch.bfloat16) -> triton.Config:
    """3 accumulators ``[BLOCK_CO, BLOCK_CI]``: ``BLOCK_CO`` over ``k`` (12 -> 16), ``BLOCK_CI = 16`` unless
    ``Cin`` is a multiple of 32 (48 = 3 exact programs); 8 warps for FMA dots (4 spill)."""
    return pick(CONFIGS_3X3, 8 if fma_dots(dtype) else 4, BH=8 if w > 4 else 16, BLOCK_CO=pow2(cout, 16, 32),
                BLOCK_CI=32 if cin % 32 == 0 else 16)


def heuristic(ks: int, w: int, cout: int, cin: int, dtype: torch.dtype) -> triton.Config:
    return heuristic_1x1(cout, cin, dtype) if ks == 1 else heuristic_3x3(w, cout, cin, dtype)


def pixel_tiles(ks: int, n: int, h: int, w: int, config: triton.Config) -> int:
    if ks == 1:
        return triton.cdiv(n * h * w, config.kwargs["BLOCK_P"])
    return halo_tiles(n, h, w, config.kwargs["BH"], config.kwargs["BW"])


def split(n_tiles: int, channel_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(S, tiles per split)``: about :data:`WAVES` programs per SM over all channel blocks, every split
    non-empty."""
    want = max(1, triton.cdiv(WAVES * sm_count(device), channel_blocks))
    per = max(1, triton.cdiv(n_tiles, min(want, max(n_tiles, 1))))
    return max(1, triton.cdiv(n_tiles, per)), per


def plan(ks: int, x: torch.Tensor, cin: int, cout: int, config: triton.Config | None = None
         ) -> tuple[triton.Config, int]:
    """``(config, S)`` of :func:`conv_wgrad` for the rows buffer ``x`` (S from the SM count)."""
    n, h, wd, _ = x.shape
    cfg = config or heuristic(ks, wd, cout, cin, x.dtype)
    rows = 3 if ks == 3 else 1          # the 3x3 kernel's programs per channel block: one per tap row
    blocks = triton.cdiv(cout, cfg.kwargs["BLOCK_CO"]) * triton.cdiv(cin, cfg.kwargs["BLOCK_CI"]) * rows
    return cfg, split(pixel_tiles(ks, n, h, wd, cfg), blocks, x.device)[0]


def conv_wgrad(gy: torch.Tensor, gy_c0: int, x: torch.Tensor, cin: int, bn: BN, ks: int, cout: int,
               part: torch.Tensor | None = None, drop_p: float = 0.0, seeds: torch.Tensor | None = None,
               seed_idx: int = 0, config: triton.Config | None = None, splits: int | None = None
               ) -> tuple[torch.Tensor, int]:
    """Partial weight gradients ``[S, Cout * cin * ks * ks]`` (fp32; sum over the first axis for ``dw``) of
    ``y = conv(relu(bn(x[..., :cin])), w)`` for the gradient ``gy[..., gy_c0:gy_c0+cout]`` (rows buffers;
    times the dropout mask of ``seeds[seed_idx]`` when ``drop_p > 0``, 3x3 only), written into ``part``
    (flat, at least ``S * M`` elements) or a new tensor. ``splits`` overrides :func:`split`'s ``S``.
    Returns ``(partials, S)``."""
    n, h, wd, _ = x.shape
    check_pixels(n * h * wd)
    cfg, s = plan(ks, x, cin, cout, config)
    s = s if splits is None else splits
    kw = cfg.kwargs
    blocks = (triton.cdiv(cout, kw["BLOCK_CO"]), triton.cdiv(cin, kw["BLOCK_CI"]))
    per = triton.cdiv(pixel_tiles(ks, n, h, wd, cfg), s)
    m = cout * cin * ks * ks
    out = torch.empty(s * m, dtype=torch.float32, device=x.device) if part is None else part
    assert out.numel() >= s * m and out.dtype == torch.float32, (out.shape, s, m)
    common = dict(AFFINE=bn.affine, PRECISION=dot_precision(x.dtype))
    if ks == 1:
        assert gy_c0 == 0 and drop_p == 0
        launch(conv1x1_wgrad_kernel, (*blocks, s),
               (gy, x, *bn.args(), out, n * h * wd, cout, cin, ld16(gy), ld16(x), per), cfg, **common)
    else:
        launch(conv3x3_wgrad_kernel, (blocks[0], blocks[1] * 3, s),
               (gy, x, *bn.args(), out, bn.mean if seeds is None else seeds, n, h, wd, cout, cin, ld16(gy), gy_c0,
                ld16(x), per, seed_idx, float(drop_p), 1.0 / (1.0 - drop_p)),
               cfg, HAS_DROPOUT=drop_p > 0, HALO=halo_slots(kw["BH"], kw["BW"]), **common)
    return out[:s * m].view(s, m), s
