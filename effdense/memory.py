"""The memory model: the dense blocks' activation memory of a training step predicted from a model's layout, per
backend kind (:func:`predicted_activation_bytes`, checked against measurements by the tests and the ``memory``
benchmark), and the choice of the blocks whose bottlenecks the ``cpp`` backend keeps for backward
(:func:`bottleneck_plan`, which :class:`~effdense.EfficientDenseNet` uses). Measuring is
:mod:`effdense.tools.measure`'s job.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .block import EfficientDenseBlock


@dataclass(frozen=True)
class BlockShape:
    pixels: int      # H*W of one image at this block
    c0: int          # input channels
    layers: int
    k: int           # growth rate
    b: int           # bottleneck width (0 for plain layers)
    keep: bool = False   # bottlenecks kept for backward (EfficientDenseBlock.keep_bottleneck, the cpp backend)

    @property
    def c(self) -> int:
        return self.c0 + self.layers * self.k


def block_shapes(model: torch.nn.Module, size: int) -> list[BlockShape]:
    """The dense blocks of an :class:`~effdense.EfficientDenseNet` on ``size`` x ``size`` inputs."""
    out, hw = [], size
    if hasattr(model.features, "pool0"):
        hw = ((hw + 1) // 2 + 1) // 2                  # 7x7/2 conv, then 3x3/2 max-pool (padding 3 and 1)
    for name, m in model.features.named_children():
        if isinstance(m, EfficientDenseBlock):
            b = m.denselayer1.conv1.out_channels if m.bottleneck else 0
            out.append(BlockShape(hw * hw, m.num_input_features, len(m), m.growth_rate, b,
                                  bool(b and m.keep_bottleneck)))
        elif name.startswith("transition"):
            hw //= 2
    return out


def predicted_activation_bytes(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype,
                               kind: str, device: torch.device | str = "cpu") -> int:
    """Dense-block activation memory of one training step, predicted from the model's layout.

    ``kind`` is ``"naive"``, ``"checkpoint"``, ``"efficient"`` or ``"fused"``. With ``P`` pixels, ``c_l = C0 + l*k``,
    ``C = C0 + L*k``, ``e`` bytes per stored element and ``g`` per gradient element (fp32 for fp16/bf16):
    what is kept for backward, summed over blocks, plus the worst block's backward transients.

    * kept, naive: each layer's concatenation and BN-ReLU output (``2 c_l``), its bottleneck and that
      bottleneck's BN-ReLU output (``2B``) and its ``k`` new channels, plus the block's concatenated output;
      checkpoint: per layer only ``2B`` (what norm2/conv2 keep), plus the feature maps and the output (``2C``);
      efficient and fused: the feature buffer ``C``.
    * transients, every kind: the gradients of the block's features and of one layer's input and bottleneck,
      ``3C*g + 2B*g``; checkpoint adds the recomputed concatenation and BN-ReLU output (``2C*e``), efficient the
      recomputed BN-ReLU input and bottleneck (``C*e + 2B*e``).
    * fused, the ``cpp`` driver (on CPU unless ``device`` is CUDA), whose BN-ReLU-conv tiles stay in cache and
      add their input gradients into one gradient buffer: during block ``j``'s backward (last block first) the
      feature buffers of blocks ``1..j``, the gradient of block ``j``'s features it receives (``C*g``) and the
      driver's workspace, which a forward with a backward to come takes at its backward's size and which is then
      held at the largest such size (block 1's, the most pixels): the gradient buffer, the new channels'
      gradient, the recomputed bottleneck and its BN-ReLU output (whose buffer takes the bottleneck's gradient),
      ``C*g + k*e + 2B*e``. A
      block that keeps its bottlenecks keeps ``L*B`` more, alive until its own backward, and its workspace needs
      one ``B*e`` less. On CUDA (``device``) each block call takes its own workspace from the caching allocator,
      and cuDNN writes the bottleneck's gradient (``B*g``) beside it.

    Stem, transitions and classifier are the same for every backend and left out.
    """
    if kind not in ("naive", "checkpoint", "efficient", "fused"):
        raise ValueError(f"kind must be 'naive', 'checkpoint', 'efficient' or 'fused', got {kind!r}")
    e = torch.finfo(dtype).bits // 8
    g = max(e, 4)
    shapes = block_shapes(model, size)
    if kind == "fused":
        return _fused_peak(shapes, batch, e, g, [s.keep for s in shapes], torch.device(device).type == "cpu")
    kept, worst = 0, 0
    for s in shapes:
        p = batch * s.pixels
        if kind == "efficient":
            kept += p * s.c * e
            extra = s.c * e + 2 * s.b * e
        elif kind == "checkpoint":
            kept += p * (2 * s.c + s.layers * 2 * s.b) * e
            extra = 2 * s.c * e
        else:
            kept += p * (sum(2 * (s.c0 + i * s.k) + 2 * s.b + s.k for i in range(s.layers)) + s.c) * e
            extra = 0
        worst = max(worst, p * (3 * s.c * g + 2 * s.b * g + extra))
    return kept + worst


def _fused_peak(shapes: list[BlockShape], batch: int, e: int, g: int, keep: list[bool], held: bool) -> int:
    """The ``"fused"`` prediction of :func:`predicted_activation_bytes`, blocks keeping bottlenecks per ``keep``,
    with the workspace ``held`` at its largest size (CPU) or taken per block call (CUDA)."""
    pixels = [batch * s.pixels for s in shapes]
    own = [p * (s.c * g + s.k * e + (1 if kp else 2) * s.b * e) for s, kp, p in zip(shapes, keep, pixels)]
    most = max(own, default=0)
    alive, worst = 0, 0
    for s, kp, p, ws in zip(shapes, keep, pixels, own):   # block j's backward: blocks 1..j hold their buffers
        alive += p * s.c * e + (p * s.layers * s.b * e if kp else 0)
        worst = max(worst, alive + p * s.c * g + (most if held else ws + p * s.b * g))
    return worst


def bottleneck_plan(model: torch.nn.Module) -> list[bool]:
    """Per dense block of ``model``, whether its ``cpp`` backward should read kept bottlenecks instead of recomputing
    them (``EfficientDenseBlock.keep_bottleneck``): yes where keeping them does not raise the predicted fp32 peak
    of a training step above that of recomputing everywhere, with each block call's own workspace (what the
    algorithm needs, and what the CUDA driver takes). The CPU driver holds its workspace at block 1's backward size
    for the whole step, so there kept bottlenecks of block 2 raise the allocator's peak, but not the resident
    memory the step adds (glibc's heap holds that much either way; ``benchmarks.rss``). Chosen greedily from the
    last block (fewest pixels, so the cheapest to keep) to the first; the answer does not depend on batch or image
    size (every term scales with the pixels, in fixed ratios between blocks), so it is taken at a size that halves
    exactly."""
    shapes = [replace(s, keep=False) for s in block_shapes(model, 2 ** (len(block_shapes(model, 1)) + 6))]
    keep = [False] * len(shapes)
    base = _fused_peak(shapes, 1, 4, 4, keep, held=False)
    for j in reversed(range(len(shapes))):
        trial = keep[:j] + [bool(shapes[j].b)] + keep[j + 1:]
        if _fused_peak(shapes, 1, 4, 4, trial, held=False) <= base:
            keep = trial
    return keep
