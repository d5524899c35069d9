"""Channel statistics: the block entry (copy into the feature buffer + Welford partials) and the one-launch finalize
(merge the partials, store mean/var, update a BatchNorm's running statistics exactly as ``nn.BatchNorm2d``).

Partials are ``[4, T, ldp]`` fp32 (:func:`partials`): plane 0 the tile means, plane 1 what their fp32 rounding
lost, plane 2 the tiles' sums of squared deviations from their mean, plane 3 column 0 the tiles' row counts
(:func:`~.common.tile_moments` of the tile's pixels). A kernel that writes them writes every one of its ``T``
tiles and returns ``T``; :func:`bn_finalize` merges exactly those rows (Chan et al.: for tiles
``(n_i, m_i, M2_i)``, ``n = sum n_i``, ``mean = sum n_i m_i / n``, ``M2 = sum M2_i + sum n_i (m_i - mean)^2``,
``var = M2 / n``; the same :func:`~.common.tile_moments` over ``BLOCK_T`` rows at a time, folded with
:func:`~.common.merge_moments`), so rows a previous launch with another tiling left behind are never read.

The running-statistics update (``num_batches_tracked += 1``; factor ``momentum``, or ``1/num_batches_tracked`` for
``momentum=None``; ``running_var`` from the unbiased ``var * n/(n-1)``; ``factor * new + (1 - factor) * old`` as
``F.batch_norm`` computes it, so +Inf stays +Inf where a ``lerp`` would make it NaN) runs in the same
single-program launch as the merge: one program, so it can read and write ``num_batches_tracked`` without a race.
"""
from __future__ import annotations

import torch
import triton
from torch.autograd.graph import increment_version
import triton.language as tl

from .common import (at_least_one, check_pixels, configs, finite, jit, launch, merge_moments, padded, pick, pow2,
                     store_tile_stats, tile_moments)

ENTRY_CONFIGS = configs(("BLOCK_P", "BLOCK_C"), [(64, 16, 4, 1), (64, 32, 4, 1), (64, 64, 4, 1)])
FINALIZE_CONFIGS = configs(("BLOCK_T", "BLOCK_C"), [(32, 16, 4, 1), (64, 32, 4, 1), (64, 64, 4, 1)])


def partials(rows: int, width: int, device) -> torch.Tensor:
    """A workspace for the Welford partials of up to ``rows`` tiles of up to ``width`` channels (the module
    docstring; planes 0 and 1 also hold the BN backward's partial sums, :mod:`.dgrad`)."""
    return torch.empty((4, max(rows, 1), padded(width)), dtype=torch.float32, device=device)


@jit
def block_entry_kernel(
    x_ptr,          # [N, C, H, W] any strides (NCHW, channels-last, a view), any float dtype
    f_ptr,          # [P, ld] rows buffer: x is stored into columns [0, C) in f's dtype (COPY)
    stats_ptr,      # [4, T, ldp] Welford partials of the stored values (STATS)
    N, C, H, W, sxn, sxc, sxh, sxw, f_ld16, plane, ldp,
    COPY: tl.constexpr, STATS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N * H * W
    hw = H * W
    n = offs_p // hw
    r = offs_p - n * hw
    h = r // W
    w = r - h * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = p_mask[:, None] & c_mask[None, :]
    src = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    x = tl.load(x_ptr + src[:, None] + offs_c[None, :].to(tl.int64) * sxc, mask=mask, other=0.0)
    y = x.to(f_ptr.dtype.element_ty)
    if COPY:
        tl.store(f_ptr + (offs_p.to(tl.int64) * (f_ld16 * 16))[:, None] + offs_c[None, :], y, mask=mask)
    if STATS:   # statistics of the values as stored (rounded to f's dtype), as nn.BatchNorm2d would see them
        store_tile_stats(y.to(tl.float32), p_mask, mask, offs_c, c_mask, pid_p, stats_ptr, plane, ldp, pid_c == 0)


def entry_heuristic(c: int) -> triton.Config:
    """One tile of channels where it fits (64), 64 pixels: a memory-bound pass."""
    return pick(ENTRY_CONFIGS, BLOCK_C=pow2(c))


def entry_tiles(x: torch.Tensor, config: triton.Config | None = None) -> int:
    """Partial rows :func:`block_entry` writes for ``x`` ``[N, C, H, W]``."""
    cfg = config or entry_heuristic(x.shape[1])
    return triton.cdiv(x.shape[0] * x.shape[2] * x.shape[3], cfg.kwargs["BLOCK_P"])


def block_entry(x: torch.Tensor, out: torch.Tensor | None, part: torch.Tensor | None,
                config: triton.Config | None = None) -> int:
    """Copy ``x`` ``[N, C, H, W]`` (any strides) into columns ``[0, C)`` of the rows buffer ``out`` (unless None)
    and/or write the Welford partials of its channels into ``part`` (unless None). Returns the partial rows
    written (``T``)."""
    n, c, h, w = x.shape
    npix = n * h * w
    check_pixels(npix)
    cfg = config or entry_heuristic(c)
    t = entry_tiles(x, cfg)
    if part is not None:
        assert part.shape[1] >= t and part.shape[2] >= c, (part.shape, t, c)
    f = x if out is None else out
    launch(block_entry_kernel, (t, triton.cdiv(c, cfg.kwargs["BLOCK_C"])),
           (x, f, x if part is None else part, n, c, h, w, *x.stride(), (f.stride(2) if out is not None else 16) // 16,
            0 if part is None else part.stride(0), 0 if part is None else part.stride(1)),
           cfg, COPY=out is not None, STATS=part is not None)
    return t


@triton.jit
def _update_running(rmean_ptr, rvar_ptr, offs, mask, mean, var, factor, unbias):
    """``running = factor * batch + (1 - factor) * running`` for the mean and the unbiased variance, as
    ``F.batch_norm`` updates them (the module docstring)."""
    rm = tl.load(rmean_ptr + offs, mask=mask, other=0.0)
    rv = tl.load(rvar_ptr + offs, mask=mask, other=0.0)
    new_m = factor * mean + (1.0 - factor) * rm.to(tl.float32)
    new_v = factor * (var * unbias) + (1.0 - factor) * rv.to(tl.float32)
    tl.store(rmean_ptr + offs, new_m.to(rm.dtype), mask=mask)
    tl.store(rvar_ptr + offs, new_v.to(rv.dtype), mask=mask)


@jit
def bn_finalize_kernel(
    stats_ptr,      # [4, T, ldp] Welford partials of M channels
    mean_ptr,       # [>= c0 + M] fp32 out: merged means go to [c0, c0 + M)
    var_ptr,        # [>= c0 + M] fp32 out: merged biased variances
    rmean_ptr,      # [c_upd] the norm's running_mean (UPDATE), any float dtype
    rvar_ptr,       # [c_upd] its running_var (UPDATE)
    nbt_ptr,        # [1] int64 its num_batches_tracked (UPDATE)
    T, M, plane, ldp, c0, c_upd, momentum, unbias,
    UPDATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # one program (see the module docstring); channels [c0, c0 + M) merged, then [0, min(c0, c_upd)) read back
    factor = momentum
    if UPDATE:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
        factor = tl.where(momentum < 0.0, 1.0 / nbt.to(tl.float32), momentum)   # momentum None: passed as -1
    for j0 in range(0, M, BLOCK_C):
        offs = j0 + tl.arange(0, BLOCK_C)
        cm = offs < M
        # the tile means (with their rounding residuals) are merged as offsets from tile 0's (a finite shift, Chan's
        # merge being shift-invariant): every rounding then scales with the spread of the means, not their size,
        # and the mean is rounded once
        shift = tl.load(stats_ptr + offs, mask=cm, other=0.0)
        shift = tl.where(finite(shift), shift, 0.0)
        n_a = 0.0
        mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rm = rows < T
            cnt = tl.load(stats_ptr + 3 * plane + rows.to(tl.int64) * ldp, mask=rm, other=0.0)
            mk = rm[:, None] & cm[None, :]
            at = rows.to(tl.int64)[:, None] * ldp + offs[None, :]
            mu = (tl.load(stats_ptr + at, mask=mk, other=0.0) - shift[None, :]) + tl.load(stats_ptr + plane + at,
                                                                                          mask=mk, other=0.0)
            m2 = tl.load(stats_ptr + 2 * plane + at, mask=mk, other=0.0)
            n_b, mean_b, _, m2_b = tile_moments(mu, cnt, mk)
            n_a, mean_a, m2_a = merge_moments(n_a, mean_a, m2_a, n_b, mean_b, tl.sum(m2, axis=0) + m2_b)
        mean_a += shift
        var = m2_a / at_least_one(n_a)
        tl.store(mean_ptr + c0 + offs, mean_a, mask=cm)
        tl.store(var_ptr + c0 + offs, var, mask=cm)
        if UPDATE:
            _update_running(rmean_ptr, rvar_ptr, c0 + offs, cm & (c0 + offs < c_upd), mean_a, var, factor, unbias)
    if UPDATE:
        old = tl.minimum(c0, c_upd)
        for j0 in range(0, old, BLOCK_C):
            offs = j0 + tl.arange(0, BLOCK_C)
            cm = offs < old
            mean = tl.load(mean_ptr + offs, mask=cm, other=0.0)
            var = tl.load(var_ptr + offs, mask=cm, other=0.0)
            _update_running(rmean_ptr, rvar_ptr, offs, cm, mean, var, factor, unbias)


def finalize_heuristic(m: int, c_upd: int = 0) -> triton.Config:
    return pick(FINALIZE_CONFIGS, BLOCK_C=pow2(max(m, min(c_upd, 64)), 16, 64))


def bn_finalize(part: torch.Tensor, t: int, m: int, mean: torch.Tensor, var: torch.Tensor, c0: int = 0,
                running: tuple | None = None, c_upd: int = 0, npix: int = 0,
                config: triton.Config | None = None) -> None:
    """Merge the first ``t`` rows of ``part`` (``m`` channels) into ``mean[c0:c0+m]``/``var[c0:c0+m]`` (fp32,
    biased variance); with ``running = (running_mean, running_var, num_batches_tracked, momentum)``
    (:func:`running_args`), also update those from ``mean[:c_upd]``/``var[:c_upd]`` (channels below ``c0`` must
    already be there) for a batch of ``npix`` pixels, in the same launch."""
    cfg = config or finalize_heuristic(m, c_upd)
    if running is not None:
        assert c_upd <= c0 + m and npix > 1, (c_upd, c0, m, npix)
        *run, momentum = running
        momentum = -1.0 if momentum is None else float(momentum)
    else:
        momentum, run = 0.0, (mean, var, mean)
    launch(bn_finalize_kernel, (1,),
           (part, mean, var, *run, t, m, part.stride(0), part.stride(1), c0, c_upd, momentum,
            npix / (npix - 1) if npix > 1 else 1.0),
           cfg, UPDATE=running is not None)
    if running is not None:     # written in place behind autograd's back: tell it, as an in-place op would
        for tensor in run:
            increment_version(tensor)


def running_args(norm: torch.nn.BatchNorm2d) -> tuple | None:
    """``(running_mean, running_var, num_batches_tracked, momentum)`` of ``norm`` if a training forward updates
    them (``nn.BatchNorm2d``'s rule), else None."""
    if not (norm.training and norm.track_running_stats and norm.running_mean is not None):
        return None
    return norm.running_mean, norm.running_var, norm.num_batches_tracked, norm.momentum
