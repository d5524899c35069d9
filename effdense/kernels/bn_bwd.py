"""The BN-ReLU backward's reductions and its elementwise finish, accumulated in place into the gradient buffer.

:func:`bn_bwd_finalize` (one launch): the per-tile partial sums of a dgrad epilogue (:mod:`.dgrad`) reduced to
``dbeta = sum g`` and ``dgamma = sum g * xhat`` (written as the parameters' gradients and as fp32 totals for the
finish), and in the same launch the split-pixel partials of a weight gradient (:mod:`.wgrad`) reduced to ``dw``
in the weight's dtype. Both reductions run over rows in a fixed order (deterministic).

:func:`bn_bwd_apply` with the complete sums::

    dx = scale * (g - dbeta / P - xhat * dgamma / P)      (batch statistics)
    dx = scale * g                                         (running statistics)

elementwise over ``[P, C]``; ``out`` (a rows buffer, e.g. ``G[:, :c]``) is overwritten or accumulated into
(``out += dx``), or ``g`` is overwritten in place, so a layer's input gradient never exists as a separate tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import BN, bn_vectors, check_pixels, configs, jit, launch, ld16, pick, pow2, xhat_tile

FINALIZE_CONFIGS = configs(("BLOCK_T", "BLOCK_C", "BLOCK_M"), [(32, 16, 256, 4, 1), (64, 64, 512, 4, 1)])
APPLY_CONFIGS = configs(("BLOCK_P", "BLOCK_C"), [(64, 16, 4, 1), (64, 32, 4, 1), (64, 64, 4, 1)])


@jit
def bn_bwd_finalize_kernel(
    sums_ptr,       # [2, T, ldp] fp32 partial sums (plane 0: g, plane 1: g * xhat)
    tot_ptr,        # [2, C] fp32 out: the complete sums (dbeta, dgamma) for bn_bwd_apply
    dgamma_ptr,     # [C] out: gamma's gradient in its dtype (AFFINE)
    dbeta_ptr,      # [C] out: beta's gradient (AFFINE)
    dwp_ptr,        # [S, M] fp32 weight-gradient partials
    dw_ptr,         # [M] out: the weight gradient in its dtype
    T, C, plane, ldp, S, M,
    AFFINE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    if pid < n_c:       # programs [0, n_c): BN sums
        offs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = offs < C
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dg = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            mk = (rows < T)[:, None] & cm[None, :]
            at = rows.to(tl.int64)[:, None] * ldp + offs[None, :]
            db += tl.sum(tl.load(sums_ptr + at, mask=mk, other=0.0), axis=0)
            dg += tl.sum(tl.load(sums_ptr + plane + at, mask=mk, other=0.0), axis=0)
        tl.store(tot_ptr + offs, db, mask=cm)
        tl.store(tot_ptr + C + offs, dg, mask=cm)
        if AFFINE:
            tl.store(dgamma_ptr + offs, dg.to(dgamma_ptr.dtype.element_ty), mask=cm)
            tl.store(dbeta_ptr + offs, db.to(dbeta_ptr.dtype.element_ty), mask=cm)
    else:               # programs [n_c, n_c + cdiv(M, BLOCK_M)): the weight gradient
        offs_m = (pid - n_c) * BLOCK_M + tl.arange(0, BLOCK_M)    # (names differ from the other branch's:
        mm = offs_m < M                                            # Triton types variables across branches)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        ptrs = dwp_ptr + offs_m
        for _ in range(0, S):       # split rows in order: deterministic
            acc += tl.load(ptrs, mask=mm, other=0.0)
            ptrs += M
        tl.store(dw_ptr + offs_m, acc.to(dw_ptr.dtype.element_ty), mask=mm)


def finalize_heuristic(t: int) -> triton.Config:
    return pick(FINALIZE_CONFIGS, BLOCK_T=64 if t >= 64 else 32)


def bn_bwd_finalize(part: torch.Tensor, t: int, c: int, tot: torch.Tensor, dgamma: torch.Tensor | None,
                    dbeta: torch.Tensor | None, dw_part: torch.Tensor | None = None, dw: torch.Tensor | None = None,
                    config: triton.Config | None = None) -> None:
    """Reduce the first ``t`` rows of the dgrad sums ``part`` (``c`` channels) into ``tot`` ``[2, c]`` fp32 and
    the parameter gradients ``dgamma``/``dbeta`` (both or neither), and the ``[S, M]`` weight-gradient partials
    ``dw_part`` (if given) into ``dw`` (``M`` elements, any float dtype), in one launch."""
    cfg = config or finalize_heuristic(t)
    kw = cfg.kwargs
    s, m = (0, 0) if dw_part is None else dw_part.shape
    assert tot.dtype == torch.float32 and tot.numel() >= 2 * c and (dw_part is None or dw.numel() == m)
    affine = dgamma is not None
    grid = (triton.cdiv(c, kw["BLOCK_C"]) + triton.cdiv(m, kw["BLOCK_M"]),)
    launch(bn_bwd_finalize_kernel, grid,
           (part, tot, dgamma if affine else tot, dbeta if affine else tot,
            tot if dw_part is None else dw_part, tot if dw is None else dw,
            t, c, part.stride(0), part.stride(1), s, m), cfg, AFFINE=affine)


@jit
def bn_bwd_apply_kernel(
    g_ptr,          # [P, ld_g] fp32 rows: gradient behind the ReLU, channels [0, C)
    x_ptr,          # [P, ld_x] rows: the BN input
    out_ptr,        # [P, ld_o] rows out, channels [0, C) (may be g itself: element for element)
    mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps,    # [C] the BN (batch or running statistics)
    tot_ptr,        # [2, C] fp32 complete sums over the P pixels (dbeta, dgamma)
    P, C, g_ld16, x_ld16, o_ld16, inv_npix,
    AFFINE: tl.constexpr, BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_p < P)[:, None] & c_mask[None, :]
    rows = offs_p.to(tl.int64)
    g = tl.load(g_ptr + (rows * (g_ld16 * 16))[:, None] + offs_c[None, :], mask=mask, other=0.0)
    mu, scale, _, rs = bn_vectors(mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps, offs_c, c_mask, AFFINE)
    if BATCH_STATS:
        x = tl.load(x_ptr + (rows * (x_ld16 * 16))[:, None] + offs_c[None, :], mask=mask, other=0.0)
        db = tl.load(tot_ptr + offs_c, mask=c_mask, other=0.0) * inv_npix
        dg = tl.load(tot_ptr + C + offs_c, mask=c_mask, other=0.0) * inv_npix
        g = g - db[None, :] - xhat_tile(x, mu, rs) * dg[None, :]
    dx = g * scale[None, :]
    o_ptrs = out_ptr + (rows * (o_ld16 * 16))[:, None] + offs_c[None, :]
    if ACCUMULATE:
        dx += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, dx.to(out_ptr.dtype.element_ty), mask=mask)


def apply_heuristic(c: int) -> triton.Config:
    return pick(APPLY_CONFIGS, BLOCK_C=pow2(c))


def bn_bwd_apply(g: torch.Tensor, x: torch.Tensor, c: int, bn: BN, tot: torch.Tensor, batch_stats: bool,
                 out: torch.Tensor | None = None, accumulate: bool = False,
                 config: triton.Config | None = None) -> None:
    """``out[..., :c] (+)= dx`` of the BN-ReLU backward (module docstring) on rows buffers (``out`` None: ``g``
    is overwritten with ``dx``). ``tot`` holds the sums (:func:`bn_bwd_finalize`)."""
    n, h, w, _ = x.shape
    npix = n * h * w
    check_pixels(npix)
    cfg = config or apply_heuristic(c)
    o = g if out is None else out
    grid = (triton.cdiv(npix, cfg.kwargs["BLOCK_P"]), triton.cdiv(c, cfg.kwargs["BLOCK_C"]))
    launch(bn_bwd_apply_kernel, grid,
           (g, x, o, *bn.args(), tot, npix, c, ld16(g), ld16(x), ld16(o), 1.0 / max(npix, 1)),
           cfg, AFFINE=bn.affine, BATCH_STATS=batch_stats, ACCUMULATE=accumulate)
