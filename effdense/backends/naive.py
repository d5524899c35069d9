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




def batch_norm(norm: nn.BatchNorm2d, x: Tensor, update_running_stats: bool = True) -> Tensor:
    """``norm(x)``, optionally without touching its running statistics (for recomputation).

    The recomputation runs the same op on throwaway copies of the running buffers, so checkpointing sees
    the same saved tensors as in the first forward while the real buffers are updated once.
    """
    if not update_running_stats and norm.training and norm.track_running_stats:
        if type(norm) is not nn.BatchNorm2d:  # e.g. SyncBatchNorm: its own forward, buffers restored after
            saved = [b.clone() for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked)]
            out = norm(x)
            with torch.no_grad():
                for b, v in zip((norm.running_mean, norm.running_var, norm.num_batches_tracked), saved):
                    b.copy_(v)
            return out
        return F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias,
                            True, 0.0, norm.eps)
    return norm(x)


def _stage1(layer: nn.Module, features: Sequence[Tensor], update_running_stats: bool = True) -> Tensor:
    """concat -> norm1 -> relu -> conv1 (the bottleneck conv, or the 3x3 conv of a plain layer)."""
    x = torch.cat(list(features), 1)
    return layer.conv1(F.relu(batch_norm(layer.norm1, x, update_running_stats), inplace=True))


def _rest(layer: nn.Module, out: Tensor) -> Tensor:
    if getattr(layer, "norm2", None) is not None:
        out = layer.conv2(F.relu(layer.norm2(out), inplace=True))
    if layer.drop_rate > 0:
        out = F.dropout(out, p=layer.drop_rate, training=layer.training)
    return out


def layer_forward(layer: nn.Module, features: Sequence[Tensor], use_checkpoint: bool = False) -> Tensor:
    """One dense layer on the list of earlier feature maps; returns its ``growth_rate`` new channels."""
    if use_checkpoint and torch.is_grad_enabled():
        calls = [0]

        def stage1(*feats: Tensor) -> Tensor:
            calls[0] += 1
            return _stage1(layer, feats, update_running_stats=calls[0] == 1)

        out = checkpoint(stage1, *features, use_reentrant=False)
    else:
        out = _stage1(layer, features)
    return _rest(layer, out)


def block_forward(x: Tensor, layers: Sequence[nn.Module], use_checkpoint: bool = False) -> Tensor:
    features = [x]
    for layer in layers:
        features.append(layer_forward(layer, features, use_checkpoint))
    return torch.cat(features, 1)


