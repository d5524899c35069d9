"""``"cpp"``: the memory-efficient dense block of docs/DESIGN.md run from C++ (csrc/, ``effdense._C``).

One operator call runs the whole block forward (``torch.ops.effdense.dense_block_forward``) and one the whole
backward (``dense_block_backward``): per layer a fixed handful of C++ steps (csrc/ops.h: BN-ReLU and the bottleneck
1x1 convolution as tiled GEMMs on CPU, csrc/cpu/; the CUDA kernels on GPU, csrc/cuda/) and 3x3 convolutions
(on CPU with AVX2 effdense's own with BN2-ReLU fused in, csrc/cpu/conv3x3.cpp; else ATen's: oneDNN, cuDNN),
no host synchronization. The algorithm and storage are those of
:mod:`effdense.backends.torch_backend`, its executable specification. Running statistics are updated once per
forward by one ``effdense::update_running_stats`` call per BN kind. Under ``--sync-bn``
(:func:`effdense.backends.bn.enable_sync_stats`, CPU tensors) the ops merge the batch statistics over the process
group themselves (csrc/sync.h).

On CPU the block's transients (the gradient buffer, the bottleneck) live in one workspace kept across layers,
blocks and steps (no fresh large allocation, hence no page faults, per step); :func:`workspace_bytes` says how
large it is and :func:`release_workspace` frees it.

This module also registers, for each of the five ``effdense`` operators of csrc/ops.cpp, a fake (meta)
implementation and, where the op is differentiable, its autograd formula, so ``torch.compile`` traces through the
ops and ``torch.library.opcheck`` passes. (The block driver's steps are C++ functions, not operators;
``effdense._C._testing`` exposes them to the tests.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _ext
from .base import FLOAT_DTYPES, Backend
from .bn import acc_dtype, sync_group, sync_stats_enabled, uses_batch_stats
from .common import BlockSetup, fused_transition, memory_format, no_autocast, refuse_double_backward

NAME = "cpp"


# ------------------------------------------------------------------------------------- fake implementations

def _empty_fmt(shape, like: Tensor, dtype: torch.dtype | None = None, fmt: Tensor | None = None) -> Tensor:
    """An empty tensor in the memory format the C++ side picks (csrc/common.h ``out_format``)."""
    mf = memory_format(like if fmt is None else fmt) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device, memory_format=mf)


def _vec(x: Tensor, n) -> Tensor:
    return x.new_empty((n,), dtype=acc_dtype(x.dtype))


def _count(sync_group) -> Tensor:
    """The forward ops' ``count``: the pixels their statistics span over every process, with ``sync_group``."""
    return torch.empty((1 if sync_group is not None else 0,), dtype=torch.int64)


def _fake_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count):
    return None


def _fake_transition_forward(x, gamma, beta, running_mean, running_var, eps, weight, sync_group=None, sync_size=0):
    n, c, h, w = x.shape
    y = _empty_fmt((n, weight.shape[0], h // 2, w // 2), x, fmt=x)
    batch = running_mean is None
    return y, _vec(x, c if batch else 0), _vec(x, c if batch else 0), _count(sync_group if batch else None)


def _fake_transition_backward(grad_y, x, gamma, beta, mean, var, eps, batch_stats, weight, sync_group=None,
                              sync_size=0, sync_count=0):
    return _empty_fmt(x.shape, x), gamma.new_empty(gamma.shape), beta.new_empty(beta.shape), torch.empty_like(weight)


def _block_dims(w1, w2):
    bottleneck = len(w2) > 0
    k = (w2[0] if bottleneck else w1[0]).shape[0]
    return len(w1), bottleneck, k, (w1[0].shape[0] if bottleneck else 0)


def _fake_block_forward(x, w1, w2, gamma1, beta1, gamma2, beta2, running_mean1, running_var1, running_mean2,
                        running_var2, eps1, eps2, drop_rate, keep_bottleneck, reserve_backward, sync_group=None,
                        sync_size=0):
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
    kept = x.new_empty((L if keep_bottleneck and bottleneck else 0, n, h, w, B))
    return (feat, _vec(x, c if stats1 else 0), _vec(x, c if stats1 else 0), mean2, torch.empty_like(mean2), mask,
            kept, _count(sync_group))


def _fake_block_backward(grad_out, feat, mean, var, mean2, var2, drop_mask, bottleneck, w1, w2, gamma1, beta1,
                         gamma2, beta2, running_mean1, running_var1, running_mean2, running_var2, eps1, eps2,
                         drop_rate, sync_group=None, sync_size=0, sync_count=0):
    L, _, k, _ = _block_dims(w1, w2)
    n, c, h, w = feat.shape
    gx = _empty_fmt((n, c - L * k, h, w), feat, fmt=feat)
    like = lambda ts: [torch.empty_like(t) for t in ts]  # noqa: E731
    return gx, like(w1), like(w2), like(gamma1), like(beta1), like(gamma2), like(beta2)


# ------------------------------------------------------------------------------------------------ autograd

_BLOCK_LISTS = ("w1", "w2", "gamma1", "beta1", "gamma2", "beta2", "running_mean1", "running_var1",
                "running_mean2", "running_var2")


def _as_passed(ctx, grads: tuple) -> tuple:
    """The gradients of the arguments the op was called with: the trailing --sync-bn arguments may have been left
    to their defaults (setup_context sees them filled in; autograd wants one gradient per argument passed)."""
    return grads[:len(ctx.needs_input_grad)]


def _sync_of(ctx, group, size, count) -> None:
    """Keep --sync-bn's group for the backward, with the pixels the forward's statistics spanned over it."""
    ctx.sync = (group, size, int(count) if group is not None else 0)


def _setup_block(ctx, inputs, output):
    x, *lists, eps1, eps2, drop_rate, keep_bottleneck, reserve_backward, group, size = inputs
    ctx.lengths = [len(v) for v in lists]
    ctx.floats = (eps1, eps2, drop_rate)
    # register_autograd wants the gradients in the inputs' structure: a list per list of tensors (also
    # empty), one leaf per other argument (torch._library.autograd.not_list_of_tensor)
    ctx.no_grads = [[None] * len(v) if isinstance(v, list) and all(isinstance(t, Tensor) for t in v) else None
                    for v in (*lists[6:], eps1, eps2, drop_rate, keep_bottleneck, reserve_backward, group, size)]
    feat, mean, var, mean2, var2, mask, kept, count = output
    _sync_of(ctx, group, size, count)
    ctx.mark_non_differentiable(mean, var, mean2, var2, mask, kept, count)
    ctx.set_materialize_grads(False)   # no zero gradients for the statistics outputs (they are not used)
    ctx.save_for_backward(feat, mean, var, mean2, var2, mask, kept, *[t for v in lists for t in v])


def _backward_block(ctx, grad_feat, *unused):
    refuse_double_backward(NAME)   # the C++ backward is not differentiable: refuse rather than compute it wrong
    if grad_feat is None:
        return _as_passed(ctx, (None, *[[None] * n for n in ctx.lengths[:6]], *ctx.no_grads))
    feat, mean, var, mean2, var2, mask, kept, *flat = ctx.saved_tensors
    lists, pos = [], 0
    for n in ctx.lengths:
        lists.append(flat[pos:pos + n])
        pos += n
    gx, *grads = torch.ops.effdense.dense_block_backward(grad_feat, feat, mean, var, mean2, var2, mask, kept,
                                                         *lists, *ctx.floats, *ctx.sync)
    return _as_passed(ctx, (gx, *grads, *ctx.no_grads))


def _setup_transition(ctx, inputs, output):
    x, gamma, beta, running_mean, running_var, eps, weight, group, size = inputs
    _, mean, var, count = output
    _sync_of(ctx, group if running_mean is None else None, size, count)   # running statistics: nothing to sync
    ctx.mark_non_differentiable(mean, var, count)
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.batch = eps, running_mean is None
    ctx.save_for_backward(x, gamma, beta, *((mean, var) if ctx.batch else (running_mean, running_var)), weight)


def _backward_transition(ctx, grad_y, *unused):
    refuse_double_backward(NAME, "transition")
    if grad_y is None:
        return _as_passed(ctx, (None,) * 9)
    x, gamma, beta, mean, var, weight = ctx.saved_tensors
    gx, dgamma, dbeta, dw = torch.ops.effdense.transition_backward(grad_y, x, gamma, beta, mean, var, ctx.eps,
                                                                   ctx.batch, weight, *ctx.sync)
    return _as_passed(ctx, (gx, dgamma, dbeta, None, None, None, dw, None, None))


def _register() -> None:
    lib = "effdense::"
    for op, fake in (("update_running_stats", _fake_update_running_stats),
                     ("transition_forward", _fake_transition_forward),
                     ("transition_backward", _fake_transition_backward),
                     ("dense_block_forward", _fake_block_forward), ("dense_block_backward", _fake_block_backward)):
        torch.library.register_fake(lib + op, fake)
    for op, backward, setup in (("dense_block_forward", _backward_block, _setup_block),
                                ("transition_forward", _backward_transition, _setup_transition)):
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


def _conv_weight(w: Tensor, cdt: torch.dtype) -> Tensor:
    return w.to(cdt) if w.shape[-1] == 1 else w.to(dtype=cdt, memory_format=torch.channels_last)


def workspace_bytes() -> int:
    """Bytes of CPU scratch memory the block driver holds for reuse across layers and steps (0 without the
    extension)."""
    return int(_ext.C.workspace_bytes()) if _ext.available() else 0


def release_workspace() -> None:
    """Free the block driver's CPU scratch memory; the next block call allocates it again."""
    if _ext.available():
        _ext.C.release_workspace()


def block_forward(x: Tensor, layers: Sequence[nn.Module], keep_bottleneck: bool = False) -> Tensor:
    """Run a dense block (``layers`` with ``norm1``/``conv1``[/``norm2``/``conv2``]) on ``x`` from C++; with
    ``keep_bottleneck`` (and a backward to come) each layer's bottleneck is kept for backward instead of
    recomputed there (:func:`effdense.memory.bottleneck_plan`)."""
    setup = BlockSetup.of(x, layers)
    bottleneck, cdt = setup.bottleneck, setup.compute_dtype
    with no_autocast(x):
        norm1 = [layer.norm1 for layer in layers]
        norm2 = [layer.norm2 for layer in layers] if bottleneck else []
        g1, b1, rm1, rv1, eps1 = _norm_args(norm1, x)
        g2, b2, rm2, rv2, eps2 = _norm_args(norm2, x)
        # the 3x3 weights channels-last (once per step, none for a channels-last model), as the block's internal
        # activations are: oneDNN would otherwise reorder them in every convolution and its backward
        w1 = [_conv_weight(layer.conv1.weight, cdt) for layer in layers]
        w2 = [_conv_weight(layer.conv2.weight, cdt) for layer in layers] if bottleneck else []
        drop = [float(layer.drop_rate) if layer.drop_rate > 0 and layer.training else 0.0 for layer in layers]
        backward = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for layer in layers for p in layer.parameters()))
        keep = bool(keep_bottleneck) and bottleneck and backward
        # with a backward to come, the CPU workspace is taken at the backward's size now (block.cpp, workspace)
        feat, mean, var, mean2, var2, _, _, count = torch.ops.effdense.dense_block_forward(
            x.to(cdt), w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, eps1, eps2, drop, keep, backward, *sync_group())
        count = _pixels(x, count)
        _update_running(norm1, mean, var, count)
        if bottleneck:
            _update_running(norm2, mean2, var2, count)
    return feat


def _pixels(x: Tensor, count: Tensor) -> int:
    """The pixels a forward op's batch statistics span: ``count`` (every process's) under --sync-bn, else x's."""
    return int(count) if count.numel() else x.shape[0] * x.shape[2] * x.shape[3]


def _fused_transition(x: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d, cdt: torch.dtype) -> Tensor:
    gamma, beta, rm, rv, eps = _norm_args([norm], x)
    y, mean, var, count = torch.ops.effdense.transition_forward(x.to(cdt), gamma[0], beta[0], rm[0], rv[0], eps[0],
                                                                conv.weight.to(cdt), *sync_group())
    if uses_batch_stats(norm):
        _update_running([norm], mean, var, _pixels(x, count))
    return y


def transition_forward(x: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
    """The DenseNet transition ``conv1x1(avgpool2x2(relu(norm(x))))`` (``effdense.models.Transition``, pooling
    first) in two ops, ``effdense::transition_forward``/``transition_backward``: with ``norm``'s batch statistics
    (its running ones updated once; under --sync-bn over every process) in training mode, its running statistics in
    eval mode; nothing of ``x``'s size is kept for backward beyond ``x``. An empty batch runs through the ops too (a
    process without images still joins the cross-process statistics); the other cases the ops do not cover run in
    PyTorch (:func:`~.common.fused_transition`)."""
    return fused_transition(x, norm, conv, _fused_transition, sync_ok=True, empty_ok=True)


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    why = _ext.reason()
    if why is not None:
        return why
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not a floating-point dtype"
    if device.type == "cuda":
        if sync_stats_enabled():
            return ("effdense._C's cross-process batch statistics (--sync-bn) run on CPU (gloo) only; on CUDA the "
                    "triton and torch backends have them")
        if not _ext.has_cuda_kernels():
            return ("effdense._C was built without its CUDA kernels (PyTorch without CUDA, or no nvcc, at "
                    "build time)")
        if not torch.cuda.is_available():
            return "CUDA is not available (torch.cuda.is_available() is False: no GPU or no driver)"
        return None
    if device.type != "cpu":
        return f"effdense._C has CPU and CUDA kernels only, not {device.type}"
    return None


BACKEND = Backend(NAME, "shared feature buffer, shared statistics, recomputation; whole block in C++ (effdense._C: "
                  "tiled BN-ReLU-GEMM and 3x3 CPU kernels, CUDA BN kernels, cuDNN 3x3 convolutions)", True,
                  block_forward, unavailable, sync_stats=True, transition=transition_forward,
                  options=("keep_bottleneck",))
