"""The kernels as ``torch.library`` custom ops (``effdense::*``), with fake (meta) implementations, so that
``torch.compile``/``torch.export`` can trace through them and ``torch.library.opcheck`` can check them.

``torch.library.custom_op`` + ``register_fake`` (available in torch 2.4+, so in both 2.11 and 2.13) rather than
``triton_op``/``wrap_triton``: the launchers allocate statistics partials and merge them, and they must also
run through Triton's CPU interpreter, which ``wrap_triton`` does not cover. The ops carry no autograd formula:
they are the pieces of the block's hand-written ``autograd.Function`` (:mod:`effdense.backends.triton_backend`),
which calls them (through the ``*_dispatch`` adapters below) only under ``torch.compile`` — there dynamo traces
the function's forward and backward into one graph with the ops opaque — and calls the launchers directly in
eager mode (no dispatcher overhead per launch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bn_bwd import bn_bwd_apply
from .dgrad import conv_dgrad_bn_relu
from .fwd import bn_relu_conv_fwd
from .wgrad import conv_wgrad

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.library.custom_op("effdense::bn_relu_conv_fwd", mutates_args=("out",))
def bn_relu_conv_fwd_op(x: Tensor, scale: Tensor, shift: Tensor, w: Tensor, out: Tensor, stats: bool,
                        drop_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """:func:`~effdense.kernels.bn_relu_conv_fwd`; returns empty statistics when ``stats`` is False."""
    st = bn_relu_conv_fwd(x, scale, shift, w, out, stats=stats, drop_p=drop_p, seed=seed)
    if st is None:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return empty, empty.clone()
    return st


@bn_relu_conv_fwd_op.register_fake
def _(x, scale, shift, w, out, stats, drop_p, seed):
    c = w.shape[0] if stats else 0
    return x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


@torch.library.custom_op("effdense::conv_dgrad_bn_relu", mutates_args=())
def conv_dgrad_bn_relu_op(gy: Tensor, w: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor,
                          invstd: Tensor, compute_dtype: str, drop_p: float, seed: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~effdense.kernels.conv_dgrad_bn_relu` (``compute_dtype`` by name: "float32", "bfloat16"...)."""
    return conv_dgrad_bn_relu(gy, w, x, scale, shift, mean, invstd, _DTYPES[compute_dtype], drop_p, seed)


@conv_dgrad_bn_relu_op.register_fake
def _(gy, w, x, scale, shift, mean, invstd, compute_dtype, drop_p, seed):
    n, _, h, wd = gy.shape
    cin = w.shape[1]
    f32 = torch.float32
    return gy.new_empty(n * h * wd, cin, dtype=f32), gy.new_empty(cin, dtype=f32), gy.new_empty(cin, dtype=f32)


@torch.library.custom_op("effdense::conv_wgrad", mutates_args=())
def conv_wgrad_op(gy: Tensor, x: Tensor, scale: Tensor, shift: Tensor, ks: int, compute_dtype: str,
                  drop_p: float, seed: int) -> Tensor:
    """:func:`~effdense.kernels.conv_wgrad`."""
    return conv_wgrad(gy, x, scale, shift, ks, _DTYPES[compute_dtype], drop_p, seed)


@conv_wgrad_op.register_fake
def _(gy, x, scale, shift, ks, compute_dtype, drop_p, seed):
    return gy.new_empty(gy.shape[1], x.shape[1], ks, ks, dtype=torch.float32)


@torch.library.custom_op("effdense::bn_bwd_apply", mutates_args=("out",))
def bn_bwd_apply_op(g: Tensor, x: Tensor, out: Tensor, scale: Tensor, mean: Tensor, invstd: Tensor,
                    dbeta: Tensor, dgamma: Tensor, batch_stats: bool, accumulate: bool) -> None:
    """:func:`~effdense.kernels.bn_bwd_apply` (``out`` written or accumulated in place)."""
    bn_bwd_apply(g, x, out, scale, mean, invstd, dbeta, dgamma, batch_stats, accumulate)


@bn_bwd_apply_op.register_fake
def _(g, x, out, scale, mean, invstd, dbeta, dgamma, batch_stats, accumulate):
    return None


# Launcher-compatible entry points through the dispatcher (what the backend calls under torch.compile, where
# dynamo must see opaque ops instead of tracing into Triton's launch machinery).
def bn_relu_conv_fwd_dispatch(x, scale, shift, w, out, stats=False, drop_p=0.0, seed=0):
    mean, var = torch.ops.effdense.bn_relu_conv_fwd(x, scale, shift, w, out, stats, float(drop_p), int(seed))
    return (mean, var) if stats else None


def conv_dgrad_bn_relu_dispatch(gy, w, x, scale, shift, mean, invstd, compute_dtype, drop_p=0.0, seed=0):
    return torch.ops.effdense.conv_dgrad_bn_relu(gy, w, x, scale, shift, mean, invstd, str(compute_dtype)[6:],
                                                 float(drop_p), int(seed))


def conv_wgrad_dispatch(gy, x, scale, shift, ks, compute_dtype, drop_p=0.0, seed=0):
    return torch.ops.effdense.conv_wgrad(gy, x, scale, shift, ks, str(compute_dtype)[6:], float(drop_p), int(seed))


def bn_bwd_apply_dispatch(g, x, out, scale, mean, invstd, dbeta, dgamma, batch_stats, accumulate):
    torch.ops.effdense.bn_bwd_apply(g, x, out, scale, mean, invstd, dbeta, dgamma, batch_stats, accumulate)
    return out
