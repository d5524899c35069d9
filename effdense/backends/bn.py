"""Batch-norm arithmetic shared by every backend: statistics, running-stat updates, and the BN-ReLU backward.

Notation, per channel, over the ``P = N*H*W`` pixels of a batch::

    mu = mean(x),  var = mean((x - mu)^2)       (biased: used to normalize)
    invstd = 1 / sqrt(var + eps),  xhat = (x - mu) * invstd
    y = relu(gamma * xhat + beta) = relu(scale * x + shift),
    scale = gamma * invstd,  shift = beta - mu * scale

Every backend applies BN-ReLU as this per-channel affine map plus a ReLU, so the kernels only ever see
``scale``/``shift`` vectors; in eval mode ``mu``/``var`` are the layer's running statistics instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: ``--sync-bn``: whether the memory-efficient blocks' batch statistics span a process group, and which
_SYNC: dict = {"on": False, "group": None}


def enable_sync_stats(group: object | None = None) -> None:
    """Make the memory-efficient backends' batch statistics span every process of ``group`` (None: the default group),
    as ``nn.SyncBatchNorm`` does: per-channel ``(count, mean, M2)`` are all-gathered and merged (Chan et al.),
    and the BN backward's per-channel sums are all-reduced."""
    _SYNC.update(on=True, group=group)


def disable_sync_stats() -> None:
    _SYNC.update(on=False, group=None)


def sync_stats_enabled() -> bool:
    return _SYNC["on"]


def sync_group() -> tuple[str | None, int]:
    """``(name, size)`` of the process group the batch statistics span under ``--sync-bn`` (the name c10d registered
    it under, by which the ``cpp`` backend's C++ ops call the functional collectives), ``(None, 0)`` when off."""
    if not _SYNC["on"]:
        return None, 0
    group = _SYNC["group"] if _SYNC["group"] is not None else dist.group.WORLD
    return group.group_name, dist.get_world_size(group)


def _world_sum(*tensors: Tensor) -> list[Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=_SYNC["group"])
    return list(flat.split([t.numel() for t in tensors]))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for statistics: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    """True where ``nn.BatchNorm2d`` normalizes with the batch's statistics (its ``bn_training``)."""
    return norm.training or norm.running_mean is None


def check_batch_size(shape: torch.Size | tuple) -> None:
    """Fail exactly where ``nn.BatchNorm2d`` fails in training mode: one value per channel."""
    n_pixels = shape[0] * shape[2] * shape[3]
    if n_pixels == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}"
        )


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` ``[N, c, H, W]`` in the accumulation dtype.

    ``torch.var_mean`` uses Welford's merge, which stays accurate where a raw sum of squares cancels. Its mean is
    NaN for a channel holding an infinity, where ``nn.BatchNorm2d``'s (a sum over the count) is that infinity:
    there the sum's is taken, so non-finite values reach the statistics exactly as in ``naive``.
    """
    if x.numel() == 0:  # an empty batch has no statistics (nn.BatchNorm2d leaves its running ones alone)
        if _SYNC["on"]:  # ... but takes part in the merge, so the other processes do not wait for it
            zero = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
            return sync_channel_stats(zero, zero, 0)
        nan = torch.full((x.shape[1],), float("nan"), dtype=acc_dtype(x.dtype), device=x.device)
        return nan, nan.clone()
    n = x.shape[0] * x.shape[2] * x.shape[3]
    xa = x.to(acc_dtype(x.dtype))
    var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
    mean = torch.where(torch.isnan(mean), xa.sum(dim=(0, 2, 3)) / n, mean)
    return sync_channel_stats(mean, var, n)


def sync_channel_stats(mean: Tensor, var: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """This process's per-channel ``mean``/biased ``var`` over ``n`` pixels, merged over every process when
    ``--sync-bn`` is on (as ``nn.SyncBatchNorm`` does): ``(n, mean, M2 = var * n)`` are all-gathered and
    combined with Chan et al.'s merge ``mean = sum(n_r mean_r) / sum(n_r)``,
    ``var = sum(M2_r + n_r (mean_r - mean)^2) / sum(n_r)`` (a process with ``n = 0`` passes zeros and adds
    nothing). Without it, returns its arguments. Every process must call it, in the same order."""
    if not _SYNC["on"]:
        return mean, var
    local = torch.cat([mean.new_tensor([float(n)]), mean, var * n])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(_SYNC["group"]))]
    dist.all_gather(parts, local, group=_SYNC["group"])
    every = torch.stack(parts)
    c = mean.numel()
    counts, means, m2 = every[:, :1], every[:, 1:1 + c], every[:, 1 + c:]
    mean = (counts * means).sum(0) / counts.sum()
    var = (m2 + counts * (means - mean) ** 2).sum(0) / counts.sum()
    return mean, var


def sync_grad_sums(dbeta: Tensor, dgamma: Tensor, n: int) -> tuple[Tensor, Tensor, int | Tensor]:
    """The per-channel sums ``sum(g)``/``sum(g * xhat)`` and pixel count that the batch-statistics BN backward
    divides (see :func:`bn_relu_backward`): this process's, or with ``--sync-bn`` their totals over every
    process, since the statistics span them (the count then a one-element tensor: no wait for the device).
    The parameter gradients stay local (DDP averages them)."""
    if not _SYNC["on"]:
        return dbeta, dgamma, n
    return tuple(_world_sum(dbeta, dgamma, dbeta.new_tensor([float(n)])))


def update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, n: int) -> None:
    """Update ``norm``'s running statistics exactly as one ``nn.BatchNorm2d`` training forward does.

    ``num_batches_tracked += 1``; the factor is ``momentum``, or ``1/num_batches_tracked`` (a cumulative
    average) when ``momentum is None``; ``running_var`` takes the unbiased variance ``var * n / (n - 1)``.
    An empty batch (``n == 0``) only counts, as ``nn.BatchNorm2d`` does.
    """
    if not (norm.training and norm.track_running_stats):
        return
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
        if _SYNC["on"]:   # the count over every process (a tensor: no wait for the device), empty ones included
            n = _world_sum(mean.new_tensor([float(n)]))[0]
            empty = n == 0                     # every process empty: mean/var are NaN, keep the running ones
            mean = torch.where(empty, norm.running_mean.to(mean.dtype), mean)
            unbiased = torch.where(empty, norm.running_var.to(var.dtype), var * (n / (n - 1).clamp(min=1)))
        elif n == 0:
            return
        else:
            unbiased = var * (n / (n - 1)) if n > 1 else var
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        # (1 - f) * old + f * new, as nn.BatchNorm2d computes it (a lerp would turn an infinity into NaN)
        norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
        norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


def scale_shift(norm: nn.BatchNorm2d, mean: Tensor | None, var: Tensor | None, dtype: torch.dtype,
                affine: tuple[Tensor | None, Tensor | None] | None = None):
    """``(scale, shift, mu, invstd)`` of ``norm`` in ``dtype`` from the batch ``mean``/``var``, or from its
    running statistics when ``mean`` is None; ``affine`` is ``(gamma, beta)`` if not the module's own (an
    autograd function passes the tensors it was given, which may be parametrized or swapped in)."""
    if mean is None:
        mean, var = norm.running_mean, norm.running_var
    mean, var = mean.to(dtype), var.to(dtype)
    invstd = torch.rsqrt(var + norm.eps)
    w, b = (norm.weight, norm.bias) if affine is None else affine
    gamma = w.to(dtype) if w is not None else torch.ones_like(mean)
    beta = b.to(dtype) if b is not None else torch.zeros_like(mean)
    scale = gamma * invstd
    return scale, beta - mean * scale, mean, invstd


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """``relu(scale * x + shift)`` per channel of ``x`` ``[N, c, H, W]`` (NaN propagates)."""
    y = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)).relu_()
    return y if out_dtype is None else y.to(out_dtype)


def bn_relu_backward(x: Tensor, grad_y: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor,
                     batch_stats: bool, relu: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``y = relu(gamma * xhat + beta)`` (of ``gamma * xhat + beta`` with ``relu=False``) w.r.t. ``x``,
    ``gamma`` and ``beta``.

    Let ``g = grad_y * [y > 0]`` (the ReLU passes the gradient where its output is positive or NaN, as
    ``threshold_backward`` does; ``g = grad_y`` without it). With sums over the ``P`` pixels of a channel::

        dbeta  = sum(g)
        dgamma = sum(g * xhat)
        dx     = scale * g                                                  (running statistics: constants)
        dx     = scale * (g - dbeta / P - xhat * dgamma / P)                (batch statistics)

    The last line follows from ``d mu / dx = 1/P`` and ``d invstd / dx = -invstd^3 (x - mu) / P``:
    ``dL/dx = gamma*invstd*(g - mean(g)) - gamma*invstd*xhat*mean(g*xhat)``.
    ``x`` and ``grad_y`` may be low precision; the arithmetic runs in the dtype of ``scale``.
    Returns ``(dx, dgamma, dbeta)`` with ``dx`` in that dtype.
    """
    dt = scale.dtype
    x = x.to(dt)
    g = grad_y.to(dt)
    if relu:
        g = g.masked_fill(torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)) <= 0, 0)
    xhat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    dbeta = g.sum(dim=(0, 2, 3))
    dgamma = (g * xhat).sum(dim=(0, 2, 3))
    if batch_stats:
        n = x.shape[0] * x.shape[2] * x.shape[3]
        sum_g, sum_gx, n = sync_grad_sums(dbeta, dgamma, n)
        g = g - (sum_g / n).view(1, -1, 1, 1) - xhat * (sum_gx / n).view(1, -1, 1, 1)
    return g.mul_(scale.view(1, -1, 1, 1)), dgamma, dbeta    # parameter gradients stay local (DDP averages)


class _SyncBatchNormFunction(torch.autograd.Function):
    """``gamma * xhat + beta`` in training mode with the statistics of every process: :func:`channel_stats` merges
    them, :func:`update_running_stats` counts every process's pixels, and the backward is :func:`bn_relu_backward`
    without the ReLU, whose per-channel sums span the processes too."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, norm: nn.BatchNorm2d) -> Tensor:
        mean, var = channel_stats(x)
        update_running_stats(norm, mean, var, x.shape[0] * x.shape[2] * x.shape[3])
        scale, shift, mu, invstd = scale_shift(norm, mean, var, acc_dtype(x.dtype), (weight, bias))
        ctx.save_for_backward(x, scale, shift, mu, invstd)
        return torch.addcmul(shift.view(1, -1, 1, 1), x.to(scale.dtype), scale.view(1, -1, 1, 1)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, scale, shift, mu, invstd = ctx.saved_tensors
        gx, dgamma, dbeta = bn_relu_backward(x, grad_y, scale, shift, mu, invstd, True, relu=False)
        need = ctx.needs_input_grad
        return gx.to(x.dtype), dgamma if need[1] else None, dbeta if need[2] else None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose batch statistics span every process while :func:`enable_sync_stats` is on, on any
    device (``nn.SyncBatchNorm`` runs on GPUs only), with the arithmetic of this module; otherwise (eval mode, sync
    off) it is ``nn.BatchNorm2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if not (uses_batch_stats(self) and sync_stats_enabled()):
            return super().forward(x)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.BatchNorm2d`` of ``model`` into a :class:`SyncBatchNorm2d`, in place (same parameters,
    buffers and ``state_dict`` keys)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return model
