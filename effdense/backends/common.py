"""What every dense-block backend shares, written once: the block's setup (:class:`BlockSetup`: its layout, the
dtype its convolutions run in, the batch check ``nn.BatchNorm2d`` makes, the flat parameter list an autograd
function takes), the transition's cases a fused kernel leaves to PyTorch (:func:`fused_transition`), and the refusal
of double backward. A backend module then holds its autograd functions and little else.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn import check_batch_size, sync_stats_enabled, uses_batch_stats


def memory_format(x: Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is laid out channels-last (also as a strided view), else contiguous; the same rule
    as csrc/common.h's ``out_format``, so a fake (meta) output has the real one's strides."""
    if x.dim() == 4 and not x.is_contiguous() and x.stride(1) == min(x.stride()) and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the convolutions run in: the autocast dtype when autocast is on for ``x``'s device (float64 stays
    float64), else ``x``'s."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def no_autocast(x: Tensor):
    """A context in which the backends' ops see the dtypes they were given (they cast to :func:`compute_dtype`
    themselves and keep statistics in fp32)."""
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()


def layer_params(layer: nn.Module) -> list[Tensor | None]:
    """A layer's differentiable tensors in the order the block functions take them: ``norm1`` weight and bias,
    ``conv1`` weight, then for a bottleneck layer ``norm2`` weight and bias and ``conv2`` weight."""
    ps = [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    if getattr(layer, "norm2", None) is not None:
        ps += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return ps


def split_params(params: Sequence, num_layers: int) -> list[Sequence]:
    """A flat per-block list (of parameters, or of ``needs_input_grad`` flags) cut into one slice per layer."""
    per = len(params) // num_layers
    return [params[i * per:(i + 1) * per] for i in range(num_layers)]


def check_block_batch(x: Tensor, layers: Sequence[nn.Module]) -> None:
    """Fail as ``nn.BatchNorm2d`` fails on one value per channel, if any BN of the block uses batch statistics."""
    norms = [m for layer in layers for m in (layer.norm1, getattr(layer, "norm2", None)) if m is not None]
    if any(uses_batch_stats(m) for m in norms):
        check_batch_size(x.shape)


@dataclass(frozen=True)
class BlockSetup:
    """One call of a dense block, as every backend sees it: ``layers`` (``norm1``/``conv1``[/``norm2``/``conv2``]),
    whether they are bottleneck layers, the growth rate ``k``, the width of the layer's first convolution (``B =
    bn_size * k`` with a bottleneck, else ``k``), the input channels ``c0``, the dtype the convolutions run in
    (:func:`compute_dtype`) and the parameter tensors, flat, in :func:`layer_params` order."""

    layers: Sequence[nn.Module]
    bottleneck: bool
    k: int
    width: int
    c0: int
    compute_dtype: torch.dtype
    params: list

    @classmethod
    def of(cls, x: Tensor, layers: Sequence[nn.Module]) -> BlockSetup:
        """The setup for input ``x``, after the batch check ``nn.BatchNorm2d`` would make."""
        check_block_batch(x, layers)
        first = layers[0]
        bottleneck = getattr(first, "norm2", None) is not None
        k = (first.conv2 if bottleneck else first.conv1).out_channels
        return cls(layers, bottleneck, k, first.conv1.out_channels, first.norm1.num_features, compute_dtype(x),
                   [p for layer in layers for p in layer_params(layer)])

    def per_layer(self, flat: Sequence) -> list[Sequence]:
        """``flat`` (the parameters, or their ``needs_input_grad`` flags) cut into one slice per layer."""
        return split_params(flat, len(self.layers))


def refuse_double_backward(name: str, what: str = "dense-block backend") -> None:
    """Inside a custom backward: double backward (``create_graph=True``) would differentiate a backward that is not
    differentiable, so refuse rather than compute it wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"the {name!r} {what} does not support double backward (create_graph=True); use "
                           "backend='naive' for higher-order gradients")


def save_block(ctx, cfg, saved, feat: Tensor, mean: Tensor | None, var: Tensor | None, params: Sequence[Tensor | None],
               x_dtype: torch.dtype) -> None:
    """What a Python block function keeps for backward: ``F``, the channel statistics and the parameter tensors it
    was given (saved, so an in-place change before backward is caught), plus its own non-tensor ``cfg`` and
    ``saved``."""
    ctx.cfg, ctx.saved, ctx.x_dtype = cfg, saved, x_dtype
    ctx.save_for_backward(feat, mean, var, *params)


def run_backward(ctx, grad_out: Tensor, name: str, block_backward) -> tuple:
    """A Python block function's backward: ``block_backward(cfg, saved, F, mean, var, params, needs, grad, x_dtype)``
    without autocast, after :func:`refuse_double_backward`; ``None`` for the function's first (``cfg``) argument."""
    refuse_double_backward(name)
    feat, mean, var, *params = ctx.saved_tensors
    with no_autocast(grad_out):
        return (None, *block_backward(ctx.cfg, ctx.saved, feat, mean, var, params, ctx.needs_input_grad[2:],
                                      grad_out, ctx.x_dtype))


# ------------------------------------------------------------------------------------------------ transition

def plain_conv1x1(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is what the fused transitions implement: a 1x1 convolution, stride 1, no padding, dilation or
    groups (a bias is added after)."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1)


def torch_transition(x: Tensor, norm: nn.Module, conv: nn.Conv2d) -> Tensor:
    """The transition ``conv1x1(avgpool2x2(relu(norm(x))))`` in PyTorch ops. The 1x1 convolution and the 2x2 average
    pool are both linear and act on different axes (channels vs pixels), so they commute; pooling first is exact
    and does a quarter of the convolution's work."""
    return conv(F.avg_pool2d(F.relu(norm(x), inplace=True), 2))


def fused_transition(x: Tensor, norm: nn.Module, conv: nn.Conv2d,
                     fused: Callable[[Tensor, nn.BatchNorm2d, nn.Conv2d, torch.dtype], Tensor],
                     sync_ok: bool = False, empty_ok: bool = False, fallback: bool = False) -> Tensor:
    """The transition through a backend's ``fused(x, norm, conv, compute_dtype)`` (autocast off, bias added here),
    or in PyTorch (:func:`torch_transition`) where fused kernels do not apply: an empty batch (unless the backend
    takes one: ``empty_ok``), H or W below 2, a convolution other than :func:`plain_conv1x1`, a norm other than a
    plain ``nn.BatchNorm2d`` (a ``SyncBatchNorm``'s statistics are its own), cross-process statistics unless the
    backend has them (``sync_ok``), or whatever else the backend says (``fallback``)."""
    if uses_batch_stats(norm):
        check_batch_size(x.shape)
    if (fallback or (x.numel() == 0 and not empty_ok) or x.shape[2] < 2 or x.shape[3] < 2 or not plain_conv1x1(conv)
            or type(norm) is not nn.BatchNorm2d or (sync_stats_enabled() and not sync_ok)):
        return torch_transition(x, norm, conv)
    with no_autocast(x):
        y = fused(x, norm, conv, compute_dtype(x))
    if conv.bias is not None:
        y = y + conv.bias.to(y.dtype).view(1, -1, 1, 1)
    return y
