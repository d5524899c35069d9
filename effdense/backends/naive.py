"""``"naive"`` and ``"checkpoint"``: torchvision's dense block, eager concatenation.

``naive`` is torchvision's ``_DenseLayer``/``_DenseBlock`` with ``memory_efficient=False``: every layer
concatenates all earlier feature maps and keeps its own BN/ReLU outputs for backward, so activation memory
is quadratic in depth. ``checkpoint`` is torchvision's ``memory_efficient=True``: the concat-BN-ReLU-conv1
stage is recomputed in backward under ``torch.utils.checkpoint``. Unlike torchvision's, it updates the BN
running statistics once per forward: the recomputation normalizes with the batch statistics but leaves
the running buffers alone.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def batch_norm(norm: nn.BatchNorm2d, x: Tensor, weight: Tensor | None, bias: Tensor | None,
               eval_stats: tuple[Tensor | None, Tensor | None], update_running_stats: bool = True) -> Tensor:
    """``norm(x)`` with its tensors given: ``weight``, ``bias``, and the running statistics it normalizes with
    in eval mode (so a checkpointed recomputation uses the tensors of the first forward); optionally without
    touching the running statistics (for that recomputation, which runs the same op on throwaway copies of the
    buffers, so checkpointing sees the same saved tensors while the real buffers are updated once)."""
    if type(norm) is not nn.BatchNorm2d:  # e.g. SyncBatchNorm: its own forward, on throwaway buffers if need be
        if update_running_stats or not (norm.training and norm.track_running_stats):
            return norm(x)
        names = ("running_mean", "running_var", "num_batches_tracked")
        real = [getattr(norm, n) for n in names]
        for n, b in zip(names, real):
            setattr(norm, n, b.clone())
        try:
            return norm(x)
        finally:
            for n, b in zip(names, real):
                setattr(norm, n, b)
    factor = 0.0 if norm.momentum is None else norm.momentum
    running_mean, running_var = eval_stats
    if norm.training and norm.track_running_stats:
        running_mean, running_var = norm.running_mean, norm.running_var
        if update_running_stats:
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
        else:
            running_mean, running_var, factor = running_mean.clone(), running_var.clone(), 0.0
    return F.batch_norm(x, running_mean, running_var, weight, bias, norm.training or running_mean is None,
                        factor, norm.eps)


def _stage1(layer: nn.Module, features: Sequence[Tensor], weights: Sequence[Tensor | None],
            update_running_stats: bool = True) -> Tensor:
    """concat -> norm1 -> relu -> conv1 (the bottleneck conv, or the 3x3 conv of a plain layer); ``weights`` are
    norm1's weight and bias, conv1's weight, and the running mean and variance norm1 uses in eval mode."""
    x = torch.cat(list(features), 1)
    y = F.relu(batch_norm(layer.norm1, x, weights[0], weights[1], weights[3:], update_running_stats), inplace=True)
    return F.conv2d(y, weights[2], None, layer.conv1.stride, layer.conv1.padding)


def _rest(layer: nn.Module, out: Tensor) -> Tensor:
    if getattr(layer, "norm2", None) is not None:
        out = layer.conv2(F.relu(layer.norm2(out), inplace=True))
    if layer.drop_rate > 0:
        out = F.dropout(out, p=layer.drop_rate, training=layer.training)
    return out


def layer_forward(layer: nn.Module, features: Sequence[Tensor], use_checkpoint: bool = False) -> Tensor:
    """One dense layer on the list of earlier feature maps; returns its ``growth_rate`` new channels."""
    norm = layer.norm1
    eval_stats = (None, None) if norm.training else (norm.running_mean, norm.running_var)
    weights = (norm.weight, norm.bias, layer.conv1.weight, *eval_stats)
    if use_checkpoint and torch.is_grad_enabled():
        calls = [0]

        def stage1(*args: Tensor) -> Tensor:
            calls[0] += 1
            return _stage1(layer, args[5:], args[:5], update_running_stats=calls[0] == 1)

        # the weights and statistics are inputs of the checkpointed function: the recomputation in backward uses
        # the same tensors as the forward (torch.func.functional_call, parametrizations), not the module's at that time
        out = checkpoint(stage1, *weights, *features, use_reentrant=False)
    else:
        out = _stage1(layer, features, weights)
    return _rest(layer, out)


def block_forward(x: Tensor, layers: Sequence[nn.Module], use_checkpoint: bool = False) -> Tensor:
    features = [x]
    for layer in layers:
        features.append(layer_forward(layer, features, use_checkpoint))
    return torch.cat(features, 1)


