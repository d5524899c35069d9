"""``"triton"``: the memory-efficient dense block of DESIGN.md on fused Triton kernels (:mod:`effdense.kernels`).

Same algorithm, storage and saved state as the ``"torch"`` specification (:mod:`.torch_backend`): one feature
buffer ``F``, per-channel statistics computed once when a channel is written, per-layer ``scale``/``shift``,
recomputation in backward, one gradient buffer ``G`` accumulated in place. Per layer:

Forward (2 kernel launches for a bottleneck layer, 1 for a plain layer)
  1. ``Z = conv1x1(relu(bn1(F[:, :c])))`` with BN2's statistics of ``Z`` from the epilogue
     (:func:`~effdense.kernels.bn_relu_conv_fwd`; ``Z`` is a channels-last ``[N, B, H, W]`` transient).
  2. ``F[:, c:c+k] = dropout(conv3x3(relu(bn2(Z))))`` stored in place, with the statistics of the new
     channels (for every later layer's BN1) from the same epilogue; the dropout mask is Philox(seed, index).
Backward (recompute ``Z`` with kernel 1, then)
  3. ``dW2`` = wgrad with ``A = relu(bn2(Z))`` recomputed in its prologue and the dropout mask regenerated.
  4. ``g2`` = dgrad of conv3x3 with ReLU backward and BN2's ``dbeta``/``dgamma`` sums in the epilogue;
     ``gZ`` finished in place over ``g2`` by :func:`~effdense.kernels.bn_bwd_apply`.
  5. ``dW1`` = wgrad with ``relu(bn1(F[:, :c]))`` recomputed in its prologue; ``g1`` = dgrad of conv1x1 with
     BN1's sums in the epilogue; :func:`~effdense.kernels.bn_bwd_apply` adds ``dx`` into ``G[:, :c]`` in place.
Backward launches per bottleneck layer: 1 recompute + 2 wgrad + 2 dgrad + 2 elementwise. Not fused yet: the
finish of each BN backward is a separate elementwise pass (it needs the complete sums; it could move into the
prologue of the next GEMM that reads ``gZ``), ``gZ`` and ``g1`` are materialized in fp32 (width ``B`` and
``c``: one layer's transients, linear in depth), the per-tile statistics and sums are merged, and the per-layer
``scale``/``shift`` vectors computed, with a few small PyTorch ops; ``x0``'s statistics use
:func:`~effdense.backends.bn.channel_stats`. The 3x3 conv is always the Triton implicit GEMM (no cuDNN
dispatch by size yet: that needs GPU measurements).

With ``--sync-bn`` (:func:`~effdense.backends.bn.enable_sync_stats`) the statistics each kernel epilogue
returns are merged over every process before use, and the BN backward's sums are all-reduced before the
elementwise finish: the same cross-process math as the ``"torch"`` backend.

Dropout draws a fresh mask from a Philox seed (taken from PyTorch's CPU generator, so ``torch.manual_seed``
makes it reproducible) and regenerates it in backward: it is not ``F.dropout``'s mask, so it matches
``"naive"`` in distribution only.

Runs on CUDA (fp32/fp16/bf16, autocast included) and, with ``TRITON_INTERPRET=1`` set before ``triton`` is
imported, on CPU tensors in fp32 or fp16 through Triton's interpreter (how CI exercises it). Under
``torch.compile`` the kernels are called as ``effdense::`` custom ops (:mod:`effdense.kernels.ops`): the block
compiles with ``fullgraph=True`` (checked with ``backend="aot_eager"`` in the tests).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import torch_backend
from .base import Backend
from .bn import (acc_dtype, check_batch_size, scale_shift, update_running_stats,
                 uses_batch_stats)
from .torch_backend import (_layer_params, _split, check_block_batch, compute_dtype, forward_scale_shift,
                            init_features, run_backward, save_block)

try:
    from .. import kernels as K
    _IMPORT_ERROR: str | None = None
except ImportError as _err:  # triton missing or too old: the backend stays listed, with the reason
    K = None
    _IMPORT_ERROR = f"triton is not importable: {type(_err).__name__}: {_err}"

if K is not None:
    from ..kernels import transition as KT
from .bn import channel_stats, sync_channel_stats, sync_grad_sums, sync_stats_enabled

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: bfloat16 is broken in Triton's interpreter
INTERPRETER_DTYPES = (torch.float32, torch.float16)


@dataclass
class _Ctx:
    """Non-tensor arguments of the block function."""

    layers: Sequence[nn.Module]
    compute_dtype: torch.dtype
    bottleneck: bool
    growth_rate: int
    dropout: list = field(default_factory=list)     # per layer: (p, Philox seed); p = 0 without dropout
    bs1: list = field(default_factory=list)         # per layer: does norm1 normalize with batch statistics
    running: list = field(default_factory=list)     # per layer: [norm1, norm2] running (mean, var) used, or None


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None where the kernels can run on ``device``/``dtype``, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        if not K.interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported (Triton's interpreter)"
        if dtype not in INTERPRETER_DTYPES:
            return f"Triton's CPU interpreter runs these kernels in float32 and float16 only, got {dtype}"
        return None
    if device.type != "cuda":
        return f"no Triton kernels for device type {device.type!r}"
    if K.interpreting():
        return "TRITON_INTERPRET=1 is set: Triton runs kernels on the CPU, not on CUDA tensors"
    if dtype not in GPU_DTYPES:
        return f"dtype {dtype} is not supported (float32, float16, bfloat16)"
    return None


class _Kernels:
    """The kernel entry points: the launchers in eager mode; under ``torch.compile`` the same calls through the
    ``effdense::`` custom ops (:mod:`effdense.kernels.ops`), which dynamo treats as opaque."""

    def __getattr__(self, name: str):
        if torch.compiler.is_compiling():
            from ..kernels import ops
            return getattr(ops, f"{name}_dispatch")
        return getattr(K, name)


_K = _Kernels()


def _seed() -> int:
    """A Philox seed from PyTorch's CPU generator (reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


def _bottleneck_buffer(n: int, width: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``[N, width, H, W]`` channels-last transient: a plain ``[P, width]`` GEMM operand."""
    return torch.empty((n, width, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)


def _nhwc(g: Tensor, n: int, h: int, w: int) -> Tensor:
    """A ``[P, C]`` matrix (pixels in NHW order) viewed as ``[N, C, H, W]``."""
    return g.view(n, h, w, -1).permute(0, 3, 1, 2)


class _TritonBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Ctx, x: Tensor, *params: Tensor) -> Tensor:
        layers, cdt, k = cfg.layers, cfg.compute_dtype, cfg.growth_rate
        adt = acc_dtype(cdt)
        n, c0, h, w = x.shape
        npix = n * h * w
        cfg.bs1 = [uses_batch_stats(layer.norm1) for layer in layers]
        batch_stats = any(cfg.bs1)
        feat, mean, var = init_features(x, len(layers), k, cdt, batch_stats)
        stats2: list[tuple[Tensor, Tensor] | None] = []
        cfg.running = []
        for i, (layer, p) in enumerate(zip(layers, _split(params, len(layers)))):
            c = c0 + i * k
            s1, t1, run1 = forward_scale_shift(layer.norm1, (mean[:c], var[:c]) if cfg.bs1[i] else None, adt,
                                               p[0:2], npix)
            run2 = None
            drop = layer.drop_rate if layer.drop_rate > 0 and layer.training else 0.0
            seed = _seed() if drop > 0 else 0
            cfg.dropout.append((drop, seed))
            new = feat[:, c:c + k]
            if cfg.bottleneck:
                z = _bottleneck_buffer(n, layer.conv1.out_channels, h, w, cdt, x.device)
                st = _K.bn_relu_conv_fwd(feat[:, :c], s1, t1, p[2], z, stats=uses_batch_stats(layer.norm2))
                if st:
                    st = sync_channel_stats(*st, npix)
                stats2.append(st)
                s2, t2, run2 = forward_scale_shift(layer.norm2, st, adt, p[3:5], npix)
                st_new = _K.bn_relu_conv_fwd(z, s2, t2, p[5], new, stats=batch_stats, drop_p=drop, seed=seed)
                del z
            else:
                stats2.append(None)
                st_new = _K.bn_relu_conv_fwd(feat[:, :c], s1, t1, p[2], new, stats=batch_stats,
                                            drop_p=drop, seed=seed)
            cfg.running.append([run1, run2])
            if batch_stats:
                mean[c:c + k], var[c:c + k] = sync_channel_stats(*st_new, npix)
        save_block(ctx, cfg, stats2, feat, mean, var, params, x.dtype)
        return feat

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return run_backward(ctx, grad_out, "triton", _block_backward)


def _world_sums(dbeta: Tensor, dgamma: Tensor, npix: int, batch_stats: bool) -> tuple[Tensor, Tensor]:
    """The sums :func:`~effdense.kernels.bn_bwd_apply` divides by this process's ``P``: its own, or with
    ``--sync-bn`` the totals over every process rescaled by ``P / P_total`` (the kernel then divides by
    ``P_total``); ``dbeta``/``dgamma`` themselves stay local parameter gradients."""
    if not (batch_stats and sync_stats_enabled()):
        return dbeta, dgamma
    sum_g, sum_gx, total = sync_grad_sums(dbeta, dgamma, npix)
    return sum_g * (npix / total), sum_gx * (npix / total)


def _block_backward(cfg: _Ctx, stats2: list, feat: Tensor, mean: Tensor | None, var: Tensor | None,
                    params: Sequence[Tensor | None], needs: Sequence[bool], grad_out: Tensor,
                    x_dtype: torch.dtype) -> list[Tensor | None]:
    """Gradients of the block input and of every layer parameter (see the module docstring)."""
    layers, cdt, k = cfg.layers, cfg.compute_dtype, cfg.growth_rate
    adt = acc_dtype(cdt)
    n, _, h, w = feat.shape
    npix = n * h * w
    c0 = feat.shape[1] - len(layers) * k
    grad = torch.empty_like(feat, dtype=adt)
    grad.copy_(grad_out)
    grads: list[Tensor | None] = []
    per_layer, per_needs = _split(params, len(layers)), _split(needs, len(layers))
    for i in reversed(range(len(layers))):
        layer, c, p, need = layers[i], c0 + i * k, per_layer[i], per_needs[i]
        run1, run2 = cfg.running[i]
        x = feat[:, :c]
        s1, t1, m1, i1 = scale_shift(layer.norm1, *(run1 or (mean[:c], var[:c])), adt, p[0:2])
        drop, seed = cfg.dropout[i]
        gy = grad[:, c:c + k]
        if cfg.bottleneck:
            w1, w2 = p[2], p[5]
            z = _bottleneck_buffer(n, w1.shape[0], h, w, cdt, feat.device)
            _K.bn_relu_conv_fwd(x, s1, t1, w1, z)                      # recompute Z (no statistics)
            s2, t2, m2, i2 = scale_shift(layer.norm2, *(stats2[i] or run2), adt, p[3:5])
            dw2 = _K.conv_wgrad(gy, z, s2, t2, w2.shape[-1], cdt, drop, seed) if need[5] else None
            g2, dg2, db2 = _K.conv_dgrad_bn_relu(gy, w2, z, s2, t2, m2, i2, cdt, drop, seed)
            gz = _nhwc(g2, n, h, w)
            _K.bn_bwd_apply(g2, z, gz, s2, m2, i2, *_world_sums(db2, dg2, npix, stats2[i] is not None),
                            stats2[i] is not None, accumulate=False)
            del z
            dw1 = _K.conv_wgrad(gz, x, s1, t1, w1.shape[-1], cdt) if need[2] else None
            g1, dg1, db1 = _K.conv_dgrad_bn_relu(gz, w1, x, s1, t1, m1, i1, cdt)
            del g2, gz
            tail = [dw1, dg2, db2, dw2]
        else:
            w1 = p[2]
            dw1 = _K.conv_wgrad(gy, x, s1, t1, w1.shape[-1], cdt, drop, seed) if need[2] else None
            g1, dg1, db1 = _K.conv_dgrad_bn_relu(gy, w1, x, s1, t1, m1, i1, cdt, drop, seed)
            tail = [dw1]
        _K.bn_bwd_apply(g1, x, grad[:, :c], s1, m1, i1, *_world_sums(db1, dg1, npix, cfg.bs1[i]), cfg.bs1[i],
                        accumulate=True)
        del g1
        grads = [g.to(q.dtype) if g is not None and q is not None and nd else None
                 for g, q, nd in zip([dg1, db1, *tail], p, need)] + grads
    return [grad[:, :c0].to(x_dtype, copy=True), *grads]


def block_forward(x: Tensor, layers: Sequence[nn.Module]) -> Tensor:
    """Run a dense block on the Triton kernels (same contract as :func:`.torch_backend.block_forward`)."""
    check_block_batch(x, layers)
    if x.numel() == 0:  # nothing for a kernel to do: the specification handles the empty batch
        return torch_backend.block_forward(x, layers)
    cdt = compute_dtype(x)
    why = unavailable(x.device, cdt)
    if why is not None:
        if x.device.type == "cpu" and K.interpreting():
            # CPU bf16 autocast under the interpreter (a debugging/CI mode without bf16): run the specification
            return torch_backend.block_forward(x, layers)
        raise RuntimeError(f"backend 'triton' cannot run on {x.device} with compute dtype {cdt}: {why}")
    bottleneck = getattr(layers[0], "norm2", None) is not None
    k = (layers[0].conv2 if bottleneck else layers[0].conv1).out_channels
    cfg = _Ctx(layers=layers, compute_dtype=cdt, bottleneck=bottleneck, growth_rate=k)
    params = [p for layer in layers for p in _layer_params(layer)]
    with torch.autocast(x.device.type, enabled=False):
        return _TritonBlockFunction.apply(cfg, x, *params)




class _TransitionKernels:
    """:mod:`effdense.kernels.transition`'s launchers, or under ``torch.compile`` their custom ops."""

    def __getattr__(self, name: str):
        return getattr(KT, f"{name}_dispatch" if torch.compiler.is_compiling() else name)


_KT = _TransitionKernels()


class _TritonTransitionFunction(torch.autograd.Function):
    """``conv1x1(avgpool2x2(relu(bn(x))))`` on :mod:`effdense.kernels.transition`: one fused forward kernel;
    backward = wgrad (pooled BN-ReLU recomputed) + dgrad (pool, ReLU and BN sums in its epilogue) +
    :func:`~effdense.kernels.bn_bwd_apply`. Saves only ``x`` and per-channel vectors."""

    @staticmethod
    def forward(ctx, norm: nn.BatchNorm2d, cdt: torch.dtype, x: Tensor, gamma: Tensor | None, beta: Tensor | None,
                weight: Tensor) -> Tensor:
        n, _, h, w = x.shape
        batch = uses_batch_stats(norm)
        mean, var = channel_stats(x) if batch else (None, None)
        update_running_stats(norm, mean, var, n * h * w)
        scale, shift, mu, invstd = scale_shift(norm, mean, var, acc_dtype(cdt))
        fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
               else torch.contiguous_format)
        y = torch.empty((n, weight.shape[0], h // 2, w // 2), dtype=cdt, device=x.device, memory_format=fmt)
        _KT.transition_fwd(x, scale, shift, weight, y)
        ctx.save_for_backward(x, scale, shift, mu, invstd, weight)
        ctx.batch, ctx.cdt = batch, cdt
        ctx.param_dtypes = [None if p is None else p.dtype for p in (gamma, beta)]
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, scale, shift, mu, invstd, weight = ctx.saved_tensors
        need_x, need_g, need_b, need_w = ctx.needs_input_grad[2:6]
        dx = dgamma = dbeta = dw = None
        with torch.autocast(gy.device.type, enabled=False):
            if need_w:
                dw = _KT.transition_wgrad(gy, x, scale, shift, ctx.cdt).to(weight.dtype)
            if need_x or need_g or need_b:
                g, dgamma, dbeta = _KT.transition_dgrad(gy, weight, x, scale, shift, mu, invstd, ctx.cdt)
                if need_x:
                    dx = torch.empty_like(x)
                    _K.bn_bwd_apply(g, x, dx, scale, mu, invstd, dbeta, dgamma, ctx.batch, accumulate=False)
                del g
                dgamma = dgamma.to(ctx.param_dtypes[0]) if need_g else None
                dbeta = dbeta.to(ctx.param_dtypes[1]) if need_b else None
        return None, None, dx, dgamma, dbeta, dw


def _torch_transition(x: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
    """The transition in PyTorch ops (``effdense.models.Transition``'s math, pooling first)."""
    return conv(nn.functional.avg_pool2d(nn.functional.relu(norm(x)), 2))


def _fused_conv(conv: nn.Conv2d) -> bool:
    """Whether the kernels implement ``conv``: a plain 1x1 convolution."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1)


def transition_forward(x: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
    """DenseNet transition ``conv1x1(avgpool2x2(relu(norm(x))))`` (``effdense.models.Transition``) on the fused
    Triton kernels, with ``norm``'s batch statistics (updating its running ones once) in training mode and its
    running statistics in eval mode; the conv runs in the autocast dtype when autocast is on. Cases the kernels
    do not cover (empty batch, H or W below 2, a conv other than a plain 1x1, a norm other than a plain
    ``nn.BatchNorm2d`` or cross-process statistics, bf16 in the interpreter) run the same math in PyTorch ops."""
    if uses_batch_stats(norm):
        check_batch_size(x.shape)
    cdt = compute_dtype(x)
    why = unavailable(x.device, cdt)
    if (x.numel() == 0 or x.shape[2] < 2 or x.shape[3] < 2 or not _fused_conv(conv)
            or type(norm) is not nn.BatchNorm2d or sync_stats_enabled()      # e.g. SyncBatchNorm: its own math
            or (why is not None and x.device.type == "cpu" and K is not None and K.interpreting())):
        return _torch_transition(x, norm, conv)
    if why is not None:
        raise RuntimeError(f"backend 'triton' cannot run on {x.device} with compute dtype {cdt}: {why}")
    with torch.autocast(x.device.type, enabled=False):
        y = _TritonTransitionFunction.apply(norm, cdt, x, norm.weight, norm.bias, conv.weight)
    if conv.bias is not None:
        y = y + conv.bias.to(y.dtype).view(1, -1, 1, 1)
    return y


BACKEND = Backend("triton", "fused BN-ReLU-Conv Triton kernels on the shared feature buffer (GPU; CPU through "
                  "TRITON_INTERPRET=1)", True, block_forward, unavailable,
                  auto_devices=("cuda",), sync_stats=True, transition=transition_forward)
