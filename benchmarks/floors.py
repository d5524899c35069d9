"""Analytic floors: the efficient algorithm's predicted peak memory, and a training step's FLOPs and bytes.

For a dense block with ``P = N*H*W`` pixels, input width ``C0``, ``L`` layers, growth ``k``, bottleneck width
``B = bn_size*k`` and output width ``C = C0 + L*k`` (``e`` bytes per stored element, ``g`` per gradient
element: fp32 for fp16/bf16 storage):

* memory floor = ``sum_blocks F + max_blocks (G + T)``: every block's feature buffer ``F = P*C*e`` (each is
  the next stage's input and is kept for backward), plus, at the worst moment, one block's gradient buffer
  ``G = P*C*g`` and one layer's transients ``T = P*(C*e + 2*B*e + 2*B*g + 2*C*g)`` (the recomputed
  BN-ReLU input, bottleneck ``Z`` and its activation, their gradients, and the layer's input gradient);
* bytes floor of a training step: each layer reads its prefix and writes its ``k`` channels and ``Z`` once in
  forward, and in backward reads the prefix, ``Z`` and its ``k``-channel gradient once and reads and writes its
  slice of ``G`` once: ``P*(e*(2*c_l + 2*k + 3*B) + g*(2*c_l + k + B))`` per layer;
* FLOPs: counted by ``torch.utils.flop_counter`` over a forward and backward on the meta device (without
  recomputation: the work any implementation must do).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import effdense


def _blocks(model: torch.nn.Module, size: int) -> list[tuple[int, int, int, int, int]]:
    """(pixels per image, C0, L, k, B) for each dense block, from the model's layout and input size."""
    out, hw = [], size
    if hasattr(model.features, "pool0"):
        hw = (hw + 1) // 2
        hw = (hw + 1) // 2
    for name, m in model.features.named_children():
        if isinstance(m, effdense.EfficientDenseBlock):
            layer = m.denselayer1
            b = layer.conv1.out_channels if m.bottleneck else 0
            out.append((hw * hw, m.num_input_features, len(m), m.growth_rate, b))
        elif name.startswith("transition"):
            hw //= 2
    return out


def _sizes(dtype: torch.dtype) -> tuple[int, int]:
    e = torch.finfo(dtype).bits // 8
    return e, max(e, 4)


def memory_floor_bytes(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype) -> int:
    e, g = _sizes(dtype)
    feats, worst = 0, 0
    for pix, c0, n_layers, k, b in _blocks(model, size):
        p, c = batch * pix, c0 + n_layers * k
        feats += p * c * e
        worst = max(worst, p * c * g + p * (c * e + 2 * b * e + 2 * b * g + 2 * c * g))
    return feats + worst


def step_bytes_floor(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype) -> int:
    e, g = _sizes(dtype)
    total = 0
    for pix, c0, n_layers, k, b in _blocks(model, size):
        for layer in range(n_layers):
            c = c0 + layer * k
            total += batch * pix * (e * (2 * c + 2 * k + 3 * b) + g * (2 * c + k + b))
    return total


def step_flops(build, batch: int, size: int) -> int:
    """FLOPs of one forward + backward of ``build()`` (a model factory), counted on the meta device."""
    with torch.device("meta"):
        model = build()
        x = torch.randn(batch, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return int(counter.get_total_flops())
