"""Helpers shared by the Triton kernels: interpreter detection, dot precision, dropout, tile statistics.

Conventions of every kernel in this package:

* 4-D tensors are addressed through their strides ``(s_n, s_c, s_h, s_w)``, so NCHW, channels-last and
  channel-slice views of the feature buffer (``F[:, :c]``, ``F[:, c:c+k]``) are read and written in place.
* Pixel and element offsets are computed in int64 (``N*C*H*W`` may pass 2^31).
* Accumulation and statistics are fp32 whatever the storage dtype (fp32, fp16, bf16).
* ``tl.dot`` runs in ``"tf32"`` only where ``torch.backends.cuda.matmul.allow_tf32`` allows it, else
  ``"ieee"`` (the kwarg ``input_precision`` exists in triton 3.6 and 3.9).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


#: whether ``@triton.jit`` made interpreted kernels: Triton reads ``TRITON_INTERPRET`` when a kernel is defined,
#: so what counts is its value when this package was imported, not now
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when this package's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return INTERPRET


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` operands: tf32 only where PyTorch's matmul flag allows."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """``(s_n, s_c, s_h, s_w)`` of a 4-D tensor (a view of the feature buffer is fine)."""
    assert t.dim() == 4, t.shape
    return tuple(t.stride())  # type: ignore[return-value]


def maybe_autotune(kernel, configs, key, default):
    """``triton.autotune(configs, key)(kernel)`` on a GPU; under the interpreter the single ``default``
    config (autotuning there would only run every config on the CPU)."""
    if interpreting():
        return kernel, default
    return triton.autotune(configs=configs, key=key)(kernel), None


def launch(kernel, default, grid, *args, **kwargs):
    """Launch a kernel returned by :func:`maybe_autotune`: with the fixed ``default`` config's meta-parameters,
    or (``default`` None) letting the autotuner choose them. ``grid`` takes the meta-parameter dict."""
    if default is None:
        kernel[grid](*args, **kwargs)
    else:
        meta = dict(default.kwargs)
        kernel[grid(meta)](*args, **kwargs, **meta, num_warps=default.num_warps, num_stages=default.num_stages)


@triton.jit
def pixel_coords(offs_p, H, W):
    """``(n, h, w)`` of flat pixel indices ``offs_p`` over ``[N, H, W]``.

    Pixel indices are int32 (the launchers check ``P < 2^31``): 64-bit division costs dozens of registers
    per element on NVIDIA GPUs. Element offsets built from them are int64 (see :func:`offset`)."""
    hw = H * W
    n = offs_p // hw
    r = offs_p - n * hw
    h = r // W
    return n, h, r - h * W


def make_configs(keys: tuple[str, ...], rows: list[tuple[int, ...]]) -> list[triton.Config]:
    """One ``triton.Config`` per row ``(*block sizes in the order of keys, num_warps, num_stages)``."""
    return [triton.Config(dict(zip(keys, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


@triton.jit
def pixel_block(start, BLOCK_P: tl.constexpr, N, H, W):
    """Pixels ``start + [0, BLOCK_P)``: ``(offs_p, in-range mask, n, h, w)``."""
    offs_p = start + tl.arange(0, BLOCK_P)
    n, h, w = pixel_coords(offs_p, H, W)
    return offs_p, offs_p < N * H * W, n, h, w


@triton.jit
def shifted(h, w, p_mask, dh, dw, H, W):
    """Pixels moved by ``(dh, dw)`` and whether they are inside the image (else they read zero padding)."""
    hh = h + dh
    ww = w + dw
    return hh, ww, p_mask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)


@triton.jit
def bn_relu_tile(x, scale, shift, mask):
    """``relu(x * scale + shift)`` of a ``[rows, channels]`` tile in fp32; zero where ``mask`` is off, so
    padding and out-of-range rows are zeros of the *activation* (after BN-ReLU), as the convolution sees them."""
    return tl.where(mask, tl.maximum(x.to(tl.float32) * scale[None, :] + shift[None, :], 0.0), 0.0)


@triton.jit
def load_rows(row_ptrs, offs_k, stride_k, k_lim, rows_valid):
    """The ``[rows, K]`` tile ``row_ptrs[:, None] + offs_k * stride_k`` (zero outside), its column mask and its
    element mask: the A operand of an implicit GEMM over one tap."""
    k_mask = offs_k < k_lim
    mask = rows_valid[:, None] & k_mask[None, :]
    tile = tl.load(row_ptrs[:, None] + offs_k[None, :].to(tl.int64) * stride_k, mask=mask, other=0.0)
    return tile, k_mask, mask


@triton.jit
def offset(n, h, w, sn, sh, sw):
    """int64 element offset of pixel ``(n, h, w)`` for strides ``(sn, sh, sw)`` (``N*C*H*W`` may pass 2^31)."""
    return n.to(tl.int64) * sn + h.to(tl.int64) * sh + w.to(tl.int64) * sw


def check_pixels(npix: int) -> None:
    """The kernels index pixels in int32 (element offsets are int64)."""
    if npix >= 2 ** 31:
        raise ValueError(f"N*H*W = {npix} pixels: the Triton kernels index pixels with int32 (< 2^31)")


@triton.jit
def dropout_scale(seed, offs_p, offs_c, C, drop_p, drop_scale):
    """The dropout factor (0 or ``1/(1-p)``) of elements ``[offs_p, offs_c]`` of a ``[P, C]`` map.

    The Philox stream is indexed by the element's logical index ``p*C + c`` (int64), so the same mask comes
    back in the forward epilogue and in every backward prologue, whatever the tiling or memory layout.
    """
    idx = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    keep = tl.rand(seed, idx) >= drop_p
    return tl.where(keep, drop_scale, 0.0)


@triton.jit
def tile_stats(v, row_mask, mask):
    """Welford partials of one tile ``v`` ``[BLOCK_P, BLOCK_C]`` (fp32): per column the tile mean and the sum
    of squared deviations from it (the tile's count is ``sum(row_mask)``); merged by :func:`merge_stats`."""
    cnt = tl.sum(row_mask.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(mask, v - mean[None, :], 0.0)
    return cnt, mean, tl.sum(d * d, axis=0)


def merge_stats(cnt: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel merge of per-tile Welford partials: ``cnt`` ``[T]``, ``mean``/``m2`` ``[T, C]``
    (tiles with ``cnt == 0`` contribute nothing) -> per-channel mean and biased variance (fp32)."""
    total = cnt.sum()
    w = cnt[:, None]
    mu = (w * mean).sum(0) / total
    var = (m2.sum(0) + (w * (mean - mu) ** 2).sum(0)) / total
    return mu, var
