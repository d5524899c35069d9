"""``"cpp"``: the memory-efficient dense block of DESIGN.md run from C++ (csrc/, ``effdense._C``).

One operator call runs the whole block forward (``torch.ops.effdense.dense_block_forward``) and one the whole
backward (``dense_block_backward``), with the per-channel BN work in the extension's CPU (``at::parallel_for``)
or CUDA kernels and the convolutions in ATen (oneDNN on CPU, cuDNN/cuBLAS on GPU). The algorithm and storage
are those of :mod:`effdense.backends.torch_backend`, its executable specification. Running statistics are
updated once per forward by one ``effdense::update_running_stats`` call per BN kind.

This module also registers, for every ``effdense`` op, a fake (meta) implementation and, where the op is
differentiable, its autograd formula, so ``torch.compile`` traces through the ops and
``torch.library.opcheck`` passes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _ext
from .base import FLOAT_DTYPES, Backend
from .bn import acc_dtype, check_batch_size, uses_batch_stats
from .torch_backend import compute_dtype, memory_format

NAME = "cpp"


# ------------------------------------------------------------------------------------- fake implementations

def _empty_fmt(shape, like: Tensor, dtype: torch.dtype | None = None, fmt: Tensor | None = None) -> Tensor:
    """An empty tensor in the memory format the C++ side picks (csrc/common.h ``out_format``)."""
    mf = memory_format(like if fmt is None else fmt) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device, memory_format=mf)


def _vec(x: Tensor, n) -> Tensor:
    return x.new_empty((n,), dtype=acc_dtype(x.dtype))


def _fake_channel_stats(x):
    return _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _fake_bn_relu(x, scale, shift):
    return _empty_fmt(x.shape, x)


def _fake_bn_relu_into(x, scale, shift, out):
    return None


def _fake_bn_relu_backward(x, grad_y, scale, shift, mean, invstd, batch_stats):
    return _empty_fmt(x.shape, x), _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _fake_bn_relu_backward_into(x, grad_y, scale, shift, mean, invstd, batch_stats, grad_x, accumulate):
    return _vec(x, x.shape[1]), _vec(x, x.shape[1])


def _fake_bn_relu_conv1x1(x, scale, shift, weight):
    return _empty_fmt((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x, fmt=x)


def _fake_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count):
    return None


def _block_dims(w1, w2):
    bottleneck = len(w2) > 0
    k = (w2[0] if bottleneck else w1[0]).shape[0]
    return len(w1), bottleneck, k, (w1[0].shape[0] if bottleneck else 0)


def _fake_block_forward(x, w1, w2, gamma1, beta1, gamma2, beta2, running_mean1, running_var1, running_mean2,
                        running_var2, eps1, eps2, drop_rate):
    L, bottleneck, k, B = _block_dims(w1, w2)
    n, c0, h, w = x.shape
    c = c0 + L * k
    stats1 = any(m is None for m in running_mean1)
    a = acc_dtype(x.dtype)
    feat = _empty_fmt((n, c, h, w), x, fmt=x)
    mean2 = x.new_empty((L if bottleneck else 0, B), dtype=a)
    if any(p > 0 for p in drop_rate):
        mask = _empty_fmt((n, L * k, h, w), x, dtype=torch.bool, fmt=x)
    else:
        mask = x.new_empty((0,), dtype=torch.bool)
    return (feat, _vec(x, c if stats1 else 0), _vec(x, c if stats1 else 0), mean2, torch.empty_like(mean2), mask)


def _fake_block_backward(grad_out, feat, mean, var, mean2, var2, drop_mask, w1, w2, gamma1, beta1, gamma2, beta2,
                         running_mean1, running_var1, running_mean2, running_var2, eps1, eps2, drop_rate):
    L, _, k, _ = _block_dims(w1, w2)
    n, c, h, w = feat.shape
    gx = _empty_fmt((n, c - L * k, h, w), feat, fmt=feat)
    like = lambda ts: [torch.empty_like(t) for t in ts]  # noqa: E731
    return gx, like(w1), like(w2), like(gamma1), like(beta1), like(gamma2), like(beta2)


# ------------------------------------------------------------------------------------------------ autograd

def _setup_bn_relu(ctx, inputs, output):
    x, scale, shift = inputs
    ctx.save_for_backward(x, scale, shift)


def _backward_bn_relu(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    zero, one = torch.zeros_like(scale), torch.ones_like(scale)
    # y = relu(x * scale + shift) is BN-ReLU with mean 0, invstd 1, gamma = scale, beta = shift
    gx, gscale, gshift = torch.ops.effdense.bn_relu_backward(x, grad.to(x.dtype), scale, shift, zero, one, False)
    return gx, gscale, gshift


def _setup_channel_stats(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[0])


def _backward_channel_stats(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    n = x.shape[0] * x.shape[2] * x.shape[3]
    a = mean.dtype
    gx = torch.zeros(x.shape, dtype=a, device=x.device)
    if grad_mean is not None:
        gx = gx + (grad_mean / n).view(1, -1, 1, 1)
    if grad_var is not None:
        gx = gx + (x.to(a) - mean.view(1, -1, 1, 1)) * (2 * grad_var / n).view(1, -1, 1, 1)
    return gx.to(x.dtype)


def _setup_conv1x1(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_conv1x1(ctx, grad):
    x, scale, shift, w = ctx.saved_tensors
    u = torch.ops.effdense.bn_relu(x, scale, shift)
    gu, gw, _ = torch.ops.aten.convolution_backward(grad.to(x.dtype), u, w, None, [1, 1], [0, 0], [1, 1], False,
                                                    [0, 0], 1, [True, True, False])
    zero, one = torch.zeros_like(scale), torch.ones_like(scale)
    gx, gscale, gshift = torch.ops.effdense.bn_relu_backward(x, gu, scale, shift, zero, one, False)
    return gx, gscale, gshift, gw


_BLOCK_LISTS = ("w1", "w2", "gamma1", "beta1", "gamma2", "beta2", "running_mean1", "running_var1",
                "running_mean2", "running_var2")


def _setup_block(ctx, inputs, output):
    x, *lists, eps1, eps2, drop_rate = inputs
    ctx.lengths = [len(v) for v in lists]
    ctx.floats = (eps1, eps2, drop_rate)
    # register_autograd wants the gradients in the inputs' structure: a list per list of tensors (also
    # empty), one leaf per other argument (torch._library.autograd.not_list_of_tensor)
    ctx.no_grads = [[None] * len(v) if all(isinstance(t, Tensor) for t in v) else None
                    for v in (*lists[6:], eps1, eps2, drop_rate)]
    feat, mean, var, mean2, var2, mask = output
    ctx.mark_non_differentiable(mean, var, mean2, var2, mask)
    ctx.save_for_backward(feat, mean, var, mean2, var2, mask, *[t for v in lists for t in v])


def _backward_block(ctx, grad_feat, *unused):
    feat, mean, var, mean2, var2, mask, *flat = ctx.saved_tensors
    lists, pos = [], 0
    for n in ctx.lengths:
        lists.append(flat[pos:pos + n])
        pos += n
    gx, *grads = torch.ops.effdense.dense_block_backward(grad_feat, feat, mean, var, mean2, var2, mask, *lists,
                                                         *ctx.floats)
    return (gx, *grads, *ctx.no_grads)


def _register() -> None:
    lib = "effdense::"
    for op, fake in (("channel_stats", _fake_channel_stats), ("bn_relu", _fake_bn_relu),
                     ("bn_relu_into", _fake_bn_relu_into), ("bn_relu_backward", _fake_bn_relu_backward),
                     ("bn_relu_backward_into", _fake_bn_relu_backward_into),
                     ("bn_relu_conv1x1", _fake_bn_relu_conv1x1),
                     ("update_running_stats", _fake_update_running_stats),
                     ("dense_block_forward", _fake_block_forward), ("dense_block_backward", _fake_block_backward)):
        torch.library.register_fake(lib + op, fake)
    for op, backward, setup in (("bn_relu", _backward_bn_relu, _setup_bn_relu),
                                ("channel_stats", _backward_channel_stats, _setup_channel_stats),
                                ("bn_relu_conv1x1", _backward_conv1x1, _setup_conv1x1),
                                ("dense_block_forward", _backward_block, _setup_block)):
        torch.library.register_autograd(lib + op, backward, setup_context=setup)


if _ext.available():
    _register()


# ------------------------------------------------------------------------------------------------ backend

def _affine(param: Tensor | None, n: int, value: float, like: Tensor) -> Tensor:
    """A BN's weight/bias, or the constant it stands for when the BN has no affine parameters."""
    return param if param is not None else torch.full((n,), value, dtype=torch.float32, device=like.device)


def _norm_args(norms: Sequence[nn.BatchNorm2d], like: Tensor):
    gammas = [_affine(m.weight, m.num_features, 1.0, like) for m in norms]
    betas = [_affine(m.bias, m.num_features, 0.0, like) for m in norms]
    batch = [uses_batch_stats(m) for m in norms]
    rmean = [None if b else m.running_mean for m, b in zip(norms, batch)]
    rvar = [None if b else m.running_var for m, b in zip(norms, batch)]
    return gammas, betas, rmean, rvar, [float(m.eps) for m in norms]


def _update_running(norms: Sequence[nn.BatchNorm2d], mean: Tensor, var: Tensor, count: int) -> None:
    idx = [i for i, m in enumerate(norms) if m.training and m.track_running_stats]
    if not idx:
        return
    sel = [norms[i] for i in idx]
    torch.ops.effdense.update_running_stats(
        [m.running_mean for m in sel], [m.running_var for m in sel], [m.num_batches_tracked for m in sel],
        mean, var, idx, [-1.0 if m.momentum is None else float(m.momentum) for m in sel], count)


def block_forward(x: Tensor, layers: Sequence[nn.Module]) -> Tensor:
    """Run a dense block (``layers`` with ``norm1``/``conv1``[/``norm2``/``conv2``]) on ``x`` from C++."""
    if any(uses_batch_stats(layer.norm1) for layer in layers):
        check_batch_size(x.shape)
    bottleneck = getattr(layers[0], "norm2", None) is not None
    cdt = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        norm1 = [layer.norm1 for layer in layers]
        norm2 = [layer.norm2 for layer in layers] if bottleneck else []
        g1, b1, rm1, rv1, eps1 = _norm_args(norm1, x)
        g2, b2, rm2, rv2, eps2 = _norm_args(norm2, x)
        w1 = [layer.conv1.weight.to(cdt) for layer in layers]
        w2 = [layer.conv2.weight.to(cdt) for layer in layers] if bottleneck else []
        drop = [float(layer.drop_rate) if layer.drop_rate > 0 and layer.training else 0.0 for layer in layers]
        feat, mean, var, mean2, var2, _ = torch.ops.effdense.dense_block_forward(
            x.to(cdt), w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, eps1, eps2, drop)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        _update_running(norm1, mean, var, count)
        if bottleneck:
            _update_running(norm2, mean2, var2, count)
    return feat


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    why = _ext.reason()
    if why is not None:
        return why
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not a floating-point dtype"
    if device.type == "cuda":
        if not _ext.has_cuda_kernels():
            return ("effdense._C was built without its CUDA kernels (PyTorch without CUDA, or no nvcc, at "
                    "build time)")
        return None
    if device.type != "cpu":
        return f"effdense._C has CPU and CUDA kernels only, not {device.type}"
    return None


BACKEND = Backend(NAME, "shared feature buffer, shared statistics, recomputation; whole block in C++ "
                  "(effdense._C: CPU/CUDA BN kernels, ATen convolutions)", True, block_forward, unavailable)
