"""The DenseNet transition ``conv1x1(avgpool2x2(relu(x * scale + shift)))`` on fused kernels, forward and backward.

``nn.AvgPool2d(2, 2)`` (floor mode: an odd last row/column is dropped) and the 1x1 conv are both linear and act
on different axes, so pooling first is exact; the GEMM then runs over the ``Po = N * (H//2) * (W//2)`` pooled
pixels: ``y[Po, Cout] = a[Po, Cin] @ w[Cin, Cout]`` with
``a[po] = 1/4 * sum_{window} relu(x[p] * scale + shift)``.

Forward (:func:`transition_fwd`)
  BN-ReLU of the four pixels of each window and their average in the GEMM prologue (neither the BN-ReLU
  output nor the pooled map is ever stored), fp32 accumulation, store into a strided ``[N, Cout, Ho, Wo]``.
Backward
  * :func:`transition_dgrad`: ``gP = gY @ w`` (``[Po, Cout] x [Cout, Cin]``); in the epilogue each full-res
    pixel of a window gets ``gP / 4`` masked by its own ReLU, stored as ``g`` ``[P, Cin]`` fp32 (pixels cropped
    by the floor stay zero), with the per-tile partial sums ``dbeta = sum g``, ``dgamma = sum g * xhat``.
  * :func:`transition_wgrad`: ``dw = gY^T @ a`` with the pooled BN-ReLU ``a`` recomputed in the prologue,
    split over the pixels like :mod:`.wgrad`.
  * the BN backward's elementwise finish is :func:`effdense.kernels.bn_bwd.bn_bwd_apply` on ``g``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (bn_relu_tile, check_pixels, dot_precision, launch, load_rows, make_configs, maybe_autotune,
                     offset, pixel_block, strides4)
from .fwd import MIN_BLOCK_P
from .wgrad import _TL_DTYPES, P_PER_PROGRAM, P_QUANTUM

_FWD_KEYS = ("BLOCK_P", "BLOCK_N", "BLOCK_K")
#: autotune spaces (block sizes, warps, stages); registers and spills: python -m effdense.kernels.aot
FWD_CONFIGS = make_configs(_FWD_KEYS, [(64, 32, 32, 4, 2), (128, 32, 32, 8, 2), (64, 64, 32, 8, 2)])
DGRAD_CONFIGS = make_configs(_FWD_KEYS, [(64, 32, 16, 4, 2), (64, 64, 32, 8, 2), (128, 32, 32, 8, 2)])
_WGRAD_KEYS = ("BLOCK_CO", "BLOCK_CI", "BLOCK_P")
WGRAD_CONFIGS = make_configs(_WGRAD_KEYS, [(16, 32, 64, 4, 2), (32, 64, 64, 8, 3), (64, 64, 32, 8, 2)])
DEFAULT = make_configs(_FWD_KEYS, [(MIN_BLOCK_P, 16, 16, 4, 1)])[0]
WGRAD_DEFAULT = make_configs(_WGRAD_KEYS, [(16, 16, 32, 4, 1)])[0]


@triton.jit
def pooled_bn_relu(x_ptr, n, ho, wo, p_mask, offs_k, sxn, sxc, sxh, sxw, scale_ptr, shift_ptr, C):
    """``avgpool2x2(relu(x * scale + shift))`` of the pooled pixels ``(n, ho, wo)`` and channels ``offs_k``:
    a ``[rows, K]`` fp32 tile (zero outside ``p_mask``/``C``), the A operand of the transition's GEMMs.

    The four pixels of a window are one pointer tile plus a scalar offset each; a runtime loop over them keeps
    one tap's loads live at a time (unrolled, the compiler hoists all four and spills)."""
    k_mask = offs_k < C
    sc = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0)
    mask = p_mask[:, None] & k_mask[None, :]
    ptrs = x_ptr + offset(n, 2 * ho, 2 * wo, sxn, sxh, sxw)[:, None] + offs_k[None, :].to(tl.int64) * sxc
    a = bn_relu_tile(tl.load(ptrs, mask=mask, other=0.0), sc, sh, mask)
    for d in range(1, 4):
        x = tl.load(ptrs + ((d // 2) * sxh + (d % 2) * sxw), mask=mask, other=0.0)
        a += bn_relu_tile(x, sc, sh, mask)
    return a * 0.25


@triton.jit
def transition_fwd_kernel(
    x_ptr,          # [N, Cin, H, W] strided BN input (NCHW or channels-last), any float dtype
    scale_ptr,      # [Cin] fp32 BN scale (gamma * invstd)
    shift_ptr,      # [Cin] fp32 BN shift (beta - mean * scale)
    w_ptr,          # [Cin, Cout] contiguous conv weight (compute dtype)
    y_ptr,          # [N, Cout, Ho, Wo] strided output, Ho = H // 2, Wo = W // 2
    N, Ho, Wo, Cin, Cout,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _, p_mask, n, ho, wo = pixel_block(tl.program_id(0) * BLOCK_P, BLOCK_P, N, Ho, Wo)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cin, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = pooled_bn_relu(x_ptr, n, ho, wo, p_mask, offs_k, sxn, sxc, sxh, sxw, scale_ptr, shift_ptr, Cin)
        wt = tl.load(w_ptr + offs_k[:, None] * Cout + offs_n[None, :],
                     mask=(offs_k < Cin)[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION)
    tl.store(y_ptr + offset(n, ho, wo, syn, syh, syw)[:, None] + offs_n[None, :].to(tl.int64) * syc,
             acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def transition_dgrad_kernel(
    gy_ptr,         # [N, Cout, Ho, Wo] strided gradient of the transition output, any float dtype
    w_ptr,          # [Cout, Cin] contiguous conv weight (compute dtype)
    x_ptr,          # [N, Cin, H, W] strided BN input
    scale_ptr, shift_ptr, mean_ptr, invstd_ptr,   # [Cin] fp32 BN parameters (batch or running stats)
    g_ptr,          # [P, Cin] fp32 out (P = N*H*W, NHW order): gradient behind the ReLU; cropped rows untouched
    dbeta_ptr,      # [T, Cin] fp32 tile sums of g
    dgamma_ptr,     # [T, Cin] fp32 tile sums of g * xhat
    N, H, W, Ho, Wo, Cout, Cin,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    _pix, p_mask, n, ho, wo = pixel_block(pid_p * BLOCK_P, BLOCK_P, N, Ho, Wo)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)     # input channels ci
    n_mask = offs_n < Cin
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    g_row = gy_ptr + offset(n, ho, wo, sgn, sgh, sgw)
    for k0 in range(0, Cout, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        gy, k_mask, _ = load_rows(g_row, offs_k, sgc, Cout, p_mask)
        wt = tl.load(w_ptr + offs_k[:, None] * Cin + offs_n[None, :],
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(gy.to(wt.dtype), wt, acc, input_precision=PRECISION)
    # epilogue: the pool's backward (gP / 4 to each pixel of the window), ReLU backward, BN backward's sums
    gq = acc * 0.25
    out_mask = p_mask[:, None] & n_mask[None, :]
    sc = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    mu = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0)
    rs = tl.load(invstd_ptr + offs_n, mask=n_mask, other=0.0)
    x_ptrs = x_ptr + offset(n, 2 * ho, 2 * wo, sxn, sxh, sxw)[:, None] + offs_n[None, :].to(tl.int64) * sxc
    g_ptrs = g_ptr + ((n.to(tl.int64) * H + 2 * ho) * W + 2 * wo)[:, None] * Cin + offs_n[None, :]
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d in range(4):      # the window's pixels, one at a time (runtime loop: no hoisted loads, no spills)
        x = tl.load(x_ptrs + ((d // 2) * sxh + (d % 2) * sxw), mask=out_mask, other=0.0).to(tl.float32)
        pre = x * sc[None, :] + sh[None, :]
        g = tl.where(out_mask & ~(pre <= 0.0), gq, 0.0)     # passes where pre > 0 or NaN, as threshold_backward
        tl.store(g_ptrs + ((d // 2) * W + d % 2).to(tl.int64) * Cin, g, mask=out_mask)
        db += tl.sum(g, axis=0)
        dg += tl.sum(tl.where(out_mask, g * (x - mu[None, :]) * rs[None, :], 0.0), axis=0)
    tl.store(dbeta_ptr + pid_p.to(tl.int64) * Cin + offs_n, db, mask=n_mask)
    tl.store(dgamma_ptr + pid_p.to(tl.int64) * Cin + offs_n, dg, mask=n_mask)


@triton.jit
def transition_wgrad_kernel(
    gy_ptr,         # [N, Cout, Ho, Wo] strided gradient of the transition output
    x_ptr,          # [N, Cin, H, W] strided BN input
    scale_ptr, shift_ptr,   # [Cin] fp32
    dw_ptr,         # [SPLIT, Cout, Cin] fp32 partial weight gradients
    N, Ho, Wo, Cout, Cin, P_CHUNK,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < Cout
    offs_ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for p0 in range(0, P_CHUNK, BLOCK_P):
        _, p_mask, n, ho, wo = pixel_block(split * P_CHUNK + p0, BLOCK_P, N, Ho, Wo)
        gy = tl.load(gy_ptr + offs_co[:, None].to(tl.int64) * sgc + offset(n, ho, wo, sgn, sgh, sgw)[None, :],
                     mask=co_mask[:, None] & p_mask[None, :], other=0.0)        # [BLOCK_CO, BLOCK_P]
        a = pooled_bn_relu(x_ptr, n, ho, wo, p_mask, offs_ci, sxn, sxc, sxh, sxw, scale_ptr, shift_ptr, Cin)
        acc = tl.dot(gy.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(dw_ptr + split.to(tl.int64) * Cout * Cin + offs_co[:, None] * Cin + offs_ci[None, :], acc,
             mask=co_mask[:, None] & (offs_ci < Cin)[None, :])


_fwd, _fwd_default = maybe_autotune(transition_fwd_kernel, FWD_CONFIGS, ["Cin", "Cout"], DEFAULT)
_dgrad, _dgrad_default = maybe_autotune(transition_dgrad_kernel, DGRAD_CONFIGS, ["Cout", "Cin"], DEFAULT)
_wgrad, _wgrad_default = maybe_autotune(transition_wgrad_kernel, WGRAD_CONFIGS, ["Cout", "Cin", "P_CHUNK"],
                                        WGRAD_DEFAULT)


def _pooled(x: torch.Tensor) -> tuple[int, int, int, int]:
    """``(N, Ho, Wo, Po)`` of the 2x2 floor-mode pooling of ``x`` ``[N, C, H, W]``."""
    n, _, h, w = x.shape
    ho, wo = h // 2, w // 2
    check_pixels(n * h * w)
    return n, ho, wo, n * ho * wo


def transition_fwd(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """``out[:] = conv1x1(avgpool2x2(relu(x * scale + shift)), w)`` for ``x`` ``[N, Cin, H, W]`` (any strides),
    ``w`` ``[Cout, Cin, 1, 1]`` (cast to ``out.dtype`` for the GEMM), ``out`` ``[N, Cout, H//2, W//2]``."""
    n, ho, wo, npo = _pooled(x)
    cin, cout = x.shape[1], w.shape[0]
    assert w.shape[1] == cin and out.shape == (n, cout, ho, wo), (x.shape, w.shape, out.shape)
    wg = w.reshape(cout, cin).t().to(out.dtype).contiguous()          # [Cin, Cout]
    grid = lambda meta: (triton.cdiv(npo, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_N"]))  # noqa: E731
    launch(_fwd, _fwd_default, grid, x, scale, shift, wg, out, n, ho, wo, cin, cout, *strides4(x), *strides4(out),
           PRECISION=dot_precision(wg.dtype))
    return out


def transition_dgrad(gy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     mean: torch.Tensor, invstd: torch.Tensor, compute_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the transition's output gradient ``gy`` ``[N, Cout, H//2, W//2]``: ``(g, dgamma, dbeta)`` with
    ``g`` ``[P, Cin]`` fp32 (full-res pixels in NHW order) the gradient behind the ReLU (zero on the rows the
    floor crops), ``dbeta = sum g``, ``dgamma = sum g * (x - mean) * invstd`` per channel: the inputs of
    :func:`effdense.kernels.bn_bwd.bn_bwd_apply`. GEMM operands are cast to ``compute_dtype``."""
    n, ho, wo, npo = _pooled(x)
    _, cin, h, wd = x.shape
    cout = w.shape[0]
    wg = w.reshape(cout, cin).to(compute_dtype).contiguous()          # [Cout, Cin]
    t = triton.cdiv(npo, MIN_BLOCK_P)
    dev = x.device
    alloc = torch.zeros if (h % 2 or wd % 2) else torch.empty        # the floor crops a row or a column
    g = alloc(n * h * wd, cin, dtype=torch.float32, device=dev)
    dbeta = torch.zeros(t, cin, dtype=torch.float32, device=dev)
    dgamma = torch.zeros(t, cin, dtype=torch.float32, device=dev)
    grid = lambda meta: (triton.cdiv(npo, meta["BLOCK_P"]), triton.cdiv(cin, meta["BLOCK_N"]))  # noqa: E731
    launch(_dgrad, _dgrad_default, grid, gy, wg, x, scale, shift, mean, invstd, g, dbeta, dgamma,
           n, h, wd, ho, wo, cout, cin, *strides4(gy), *strides4(x), PRECISION=dot_precision(compute_dtype))
    return g, dgamma.sum(0), dbeta.sum(0)


def transition_wgrad(gy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """Weight gradient ``[Cout, Cin, 1, 1]`` (fp32) of the transition for its output gradient ``gy``
    ``[N, Cout, H//2, W//2]``; the pooled BN-ReLU of ``x`` is recomputed in the prologue."""
    n, ho, wo, npo = _pooled(x)
    cout, cin = gy.shape[1], x.shape[1]
    split = max(1, triton.cdiv(npo, P_PER_PROGRAM))
    chunk = triton.cdiv(triton.cdiv(max(npo, 1), split), P_QUANTUM) * P_QUANTUM
    split = max(1, triton.cdiv(npo, chunk))
    part = torch.empty(split, cout, cin, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(cout, meta["BLOCK_CO"]),  # noqa: E731
                         triton.cdiv(cin, meta["BLOCK_CI"]), split)
    launch(_wgrad, _wgrad_default, grid, gy, x, scale, shift, part, n, ho, wo, cout, cin, chunk,
           *strides4(gy), *strides4(x), PRECISION=dot_precision(compute_dtype),
           DOT_DTYPE=_TL_DTYPES[compute_dtype])
    return part.sum(0).view(cout, cin, 1, 1)


# ``torch.library`` custom ops (with fake implementations) of the three launchers, what the backend calls under
# ``torch.compile`` (dynamo cannot trace Triton's launch machinery), as :mod:`.ops` does for the block's kernels.
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.library.custom_op("effdense::transition_fwd", mutates_args=("out",))
def transition_fwd_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w: torch.Tensor,
                      out: torch.Tensor) -> None:
    """:func:`transition_fwd` (``out`` written in place)."""
    transition_fwd(x, scale, shift, w, out)


@transition_fwd_op.register_fake
def _(x, scale, shift, w, out):
    return None


@torch.library.custom_op("effdense::transition_dgrad", mutates_args=())
def transition_dgrad_op(gy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, compute_dtype: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`transition_dgrad` (``compute_dtype`` by name: "float32", "bfloat16"...)."""
    return transition_dgrad(gy, w, x, scale, shift, mean, invstd, _DTYPES[compute_dtype])


@transition_dgrad_op.register_fake
def _(gy, w, x, scale, shift, mean, invstd, compute_dtype):
    n, cin, h, wd = x.shape
    f32 = torch.float32
    return x.new_empty(n * h * wd, cin, dtype=f32), x.new_empty(cin, dtype=f32), x.new_empty(cin, dtype=f32)


@torch.library.custom_op("effdense::transition_wgrad", mutates_args=())
def transition_wgrad_op(gy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        compute_dtype: str) -> torch.Tensor:
    """:func:`transition_wgrad`."""
    return transition_wgrad(gy, x, scale, shift, _DTYPES[compute_dtype])


@transition_wgrad_op.register_fake
def _(gy, x, scale, shift, compute_dtype):
    return x.new_empty(gy.shape[1], x.shape[1], 1, 1, dtype=torch.float32)


def transition_fwd_dispatch(x, scale, shift, w, out):
    torch.ops.effdense.transition_fwd(x, scale, shift, w, out)
    return out


def transition_dgrad_dispatch(gy, w, x, scale, shift, mean, invstd, compute_dtype):
    return torch.ops.effdense.transition_dgrad(gy, w, x, scale, shift, mean, invstd, str(compute_dtype)[6:])


def transition_wgrad_dispatch(gy, x, scale, shift, compute_dtype):
    return torch.ops.effdense.transition_wgrad(gy, x, scale, shift, str(compute_dtype)[6:])
