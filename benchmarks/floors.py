"""Analytic floors: the efficient algorithm's predicted peak memory, and a training step's FLOPs and bytes.

For a dense block with ``P = N*H*W`` pixels, input width ``C0``, ``L`` layers, growth ``k``, bottleneck width
``B = bn_size*k`` and output width ``C = C0 + L*k`` (``e`` bytes per stored element, ``g`` per gradient
element: fp32 for fp16/bf16 storage):

* memory floor: :func:`effdense.memory.predicted_activation_bytes` with ``kind="fused"`` (the feature buffers,
  the gradient a block receives and the ``cpp`` driver's workspace: one block's gradient buffer and one layer's
  transients, none of them a stored BN-ReLU output);
* bytes floor of a training step: each layer reads its prefix and writes its ``k`` channels and ``Z`` once in
  forward, and in backward reads the prefix, ``Z`` and its ``k``-channel gradient once and reads and writes its
  slice of ``G`` once: ``P*(e*(2*c_l + 2*k + 3*B) + g*(2*c_l + k + B))`` per layer;
* FLOPs: counted by ``torch.utils.flop_counter`` over a forward and backward on the meta device (without
  recomputation: the work any implementation must do).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from effdense.memory import block_shapes, predicted_activation_bytes


def memory_floor_bytes(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype) -> int:
    return predicted_activation_bytes(model, batch, size, dtype, "fused")


def step_bytes_floor(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype) -> int:
    e = torch.finfo(dtype).bits // 8
    g = max(e, 4)
    total = 0
    for s in block_shapes(model, size):
        for layer in range(s.layers):
            c = s.c0 + layer * s.k
            total += batch * s.pixels * (e * (2 * c + 2 * s.k + 3 * s.b) + g * (2 * c + s.k + s.b))
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
