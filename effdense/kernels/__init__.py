"""Triton kernels of the memory-efficient dense block and the transition (one module per op, Liger-Kernel style).

* :mod:`.stats` — block entry (the input copied into the feature buffer + Welford partials) and the one-launch
  BN finalize (partials merged, mean/var stored, running statistics updated as ``nn.BatchNorm2d`` does).
* :mod:`.fwd` — BN-ReLU-Conv forward, 1x1 GEMM and 3x3 over a staged halo tile: BN-ReLU prologue, dropout +
  store into a column range of the feature buffer + Welford partials in the epilogue.
* :mod:`.dgrad` — conv input gradient: dropout mask regenerated in the prologue, ReLU backward and the BN
  backward's partial sums in the epilogue.
* :mod:`.wgrad` — conv weight gradient: BN-ReLU recomputed in the prologue, split-pixel partials.
* :mod:`.bn_bwd` — the BN backward's finalize (sums and weight-gradient partials reduced, one launch) and its
  elementwise finish, accumulated in place into the gradient buffer.
* :mod:`.transition` — BN-ReLU-AvgPool-Conv1x1 forward, dgrad and wgrad.
* :mod:`.ops` — the launchers as ``torch.library`` custom ops. :mod:`effdense.tools.aot` lists the compile set
  of a training step and compiles it for real GPU targets.

Feature maps are rows buffers (:mod:`.common`): channels-last, row stride padded to 16 elements. With
``TRITON_INTERPRET=1`` set before ``triton`` is imported the same kernels run on CPU tensors (fp32). NaN and Inf
propagate as in PyTorch (every ReLU is :func:`.common.relu`, ``max.NaN.f32``); statistics are exact for a constant
channel and rounded once whatever the mean/std ratio (:func:`.common.tile_moments`).
"""
from .bn_bwd import bn_bwd_apply, bn_bwd_finalize
from .common import (BN, INTERPRET, as_rows, dot_precision, dry_run, interpreting, nchw, padded, precision_record,
                     rows_buffer, to_rows)
from .dgrad import conv_dgrad_bn_relu
from .fwd import bn_relu_conv_fwd
from .stats import block_entry, bn_finalize, partials, running_args
from .transition import transition_dgrad, transition_fwd, transition_wgrad
from .wgrad import conv_wgrad
from . import ops  # noqa: E402,F401  (registers the effdense:: custom ops)

__all__ = ["BN", "INTERPRET", "as_rows", "block_entry", "bn_bwd_apply", "bn_bwd_finalize", "bn_finalize",
           "bn_relu_conv_fwd", "conv_dgrad_bn_relu", "conv_wgrad", "dot_precision", "dry_run", "interpreting", "nchw",
           "padded", "partials", "precision_record", "rows_buffer", "running_args", "to_rows", "transition_dgrad",
           "transition_fwd", "transition_wgrad"]
