"""Triton kernels of the memory-efficient dense block (one module per op, Liger-Kernel style).

* :mod:`.fwd` — BN-ReLU-Conv (1x1 or 3x3) forward: BN-ReLU prologue, dropout + store into a strided
  view of the feature buffer + Welford statistics in the epilogue.
* :mod:`.dgrad` — conv input gradient: dropout mask regenerated in the prologue, ReLU backward and the
  BN backward's per-channel sums in the epilogue.
* :mod:`.wgrad` — conv weight gradient: dropout in the prologue of the gradient operand, BN-ReLU
  recomputed in the prologue of the activation operand, split-P reduction.
* :mod:`.bn_bwd` — the BN backward's elementwise finish, accumulated in place into the gradient buffer.

With ``TRITON_INTERPRET=1`` set before ``triton`` is imported the same kernels run on CPU tensors (fp32).
"""
from .bn_bwd import bn_bwd_apply
from .common import INTERPRET, dot_precision, interpreting, merge_stats
from .dgrad import conv_dgrad_bn_relu
from .fwd import bn_relu_conv_fwd
from .wgrad import conv_wgrad

__all__ = ["INTERPRET", "bn_bwd_apply", "bn_relu_conv_fwd", "conv_dgrad_bn_relu", "conv_wgrad", "dot_precision",
           "interpreting", "merge_stats"]
