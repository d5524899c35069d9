"""``"torch"``: the memory-efficient dense block of docs/DESIGN.md in plain PyTorch, the executable specification
that the kernel backends are tested against.

One ``autograd.Function`` per block:

* **Forward.** One feature buffer ``F`` ``[N, C0 + L*k, H, W]`` (in the input's memory format). ``x0`` is
  copied into ``F[:, :C0]``; layer ``l`` reads the prefix ``F[:, :c_l]`` (a view) and writes its ``k`` new
  channels into ``F[:, c_l:c_l+k]``. The block returns ``F`` itself.
* **Statistics per channel, not per layer.** A channel never changes once written, so in training mode its
  batch mean/variance are computed once, when it is written, and every later layer's ``norm1`` reuses them;
  only ``gamma``/``beta`` differ per layer (:func:`effdense.backends.bn.scale_shift`). Running statistics are
  updated once per forward, never by the recomputation in backward.
* **Backward.** One gradient buffer ``G`` shaped like ``F`` (fp32 when ``F`` is fp16/bf16) starts as the
  output gradient. For ``l = L-1 ... 0``, ``G[:, c_l:c_l+k]`` is complete (only later layers read those
  channels), so the layer recomputes its BN-ReLU/conv1/BN-ReLU from ``F`` and the saved statistics, back-
  propagates, and adds its input gradient into ``G[:, :c_l]`` in place. Each layer's ``norm1`` is its own
  function of the shared channels, so summing the per-layer input gradients is exact.
* **Dropout** masks are regenerated in backward from the RNG state saved before each layer drew its mask.

Saved for backward: ``F`` (alive anyway as the output), two ``C``-vectors of channel statistics, two
``B``-vectors per layer, and one RNG state per layer: memory ``F + G +`` one layer's transients, linear in
depth. Under autocast the convolutions run in the autocast dtype and ``F`` is stored in it; statistics and
BN arithmetic stay in fp32.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn import acc_dtype, bn_relu, bn_relu_backward, channel_stats, scale_shift, update_running_stats, uses_batch_stats
from .common import BlockSetup, memory_format, no_autocast, run_backward, save_block


@dataclass
class _Ctx:
    """Non-tensor arguments of the block function: the block's setup, and what its forward records per layer."""

    setup: BlockSetup
    rng_states: list = field(default_factory=list)   # per layer: RNG state before its dropout mask, or None
    bs1: list = field(default_factory=list)          # per layer: does norm1 normalize with batch statistics
    running: list = field(default_factory=list)      # per layer: [norm1, norm2] running (mean, var) used, or None


def init_features(x: Tensor, num_layers: int, k: int, cdt: torch.dtype, batch_stats: bool):
    """The feature buffer ``F`` with ``x0`` copied into ``[:, :C0]``, and per-channel ``(mean, var)`` buffers
    holding ``x0``'s statistics (``(None, None)`` without batch statistics)."""
    n, c0, h, w = x.shape
    feat = torch.empty((n, c0 + num_layers * k, h, w), dtype=cdt, device=x.device, memory_format=memory_format(x))
    feat[:, :c0].copy_(x)
    mean = var = None
    if batch_stats:
        mean = torch.empty(feat.shape[1], dtype=acc_dtype(cdt), device=x.device)
        var = torch.empty_like(mean)
        # statistics of the tensor written, not of the buffer slice holding it: the same numbers, and inductor
        # (torch 2.13, CPU, layout optimization on) miscompiles var_mean over a channel slice of a buffer that
        # a convolution output was copied into (tests/test_compile.py)
        mean[:c0], var[:c0] = channel_stats(x.to(cdt))
    return feat, mean, var


def forward_scale_shift(norm: nn.BatchNorm2d, stats: tuple[Tensor, Tensor] | None, adt: torch.dtype,
                        affine: Sequence[Tensor | None], npix: int):
    """A block forward's ``(scale, shift, running)`` for one BN: from the batch ``stats`` (then ``norm``'s running
    statistics are updated, once) or, when None, from its running statistics, which are returned as
    ``running`` for backward to reuse."""
    running = None if stats is not None else (norm.running_mean, norm.running_var)
    if stats is not None:
        update_running_stats(norm, *stats, npix)
    scale, shift, _, _ = scale_shift(norm, *(stats or running), adt, affine)
    return scale, shift, running


def _conv(x: Tensor, w: Tensor) -> Tensor:
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _conv_backward(grad: Tensor, x: Tensor, w: Tensor, need_weight: bool) -> tuple[Tensor, Tensor | None]:
    pad = w.shape[-1] // 2
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, need_weight, False])
    return gx, gw


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _dropout_mask(like: Tensor, p: float, state: Tensor | None = None) -> Tensor:
    """The scaled mask ``F.dropout`` multiplies by; replayed from ``state`` when given."""
    if state is None:
        return F.dropout(torch.ones_like(like), p, training=True)
    dev = like.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
        if dev.type == "cuda":
            torch.cuda.set_rng_state(state, dev)
        else:
            torch.set_rng_state(state)
        return F.dropout(torch.ones_like(like), p, training=True)


class _DenseBlockFunction(torch.autograd.Function):
    """Forward and backward use the parameter tensors passed to ``apply`` (saved, so in-place changes before
    backward are caught), never the modules' attributes; the modules give only configuration (eps, momentum,
    dropout rate) and the running-statistics buffers."""

    @staticmethod
    def forward(ctx, cfg: _Ctx, x: Tensor, *params: Tensor) -> Tensor:
        layers, cdt, k = cfg.setup.layers, cfg.setup.compute_dtype, cfg.setup.k
        adt = acc_dtype(cdt)
        n, c0, h, w = x.shape
        npix = n * h * w
        cfg.bs1 = [uses_batch_stats(layer.norm1) for layer in layers]
        batch_stats = any(cfg.bs1)
        feat, mean, var = init_features(x, len(layers), k, cdt, batch_stats)
        stats2: list[tuple[Tensor, Tensor] | None] = []
        cfg.rng_states, cfg.running = [], []
        for i, (layer, p) in enumerate(zip(layers, cfg.setup.per_layer(params))):
            c = c0 + i * k
            s1, t1, run1 = forward_scale_shift(layer.norm1, (mean[:c], var[:c]) if cfg.bs1[i] else None, adt,
                                               p[0:2], npix)
            y = _conv(bn_relu(feat[:, :c], s1, t1, cdt), p[2].to(cdt))
            run2 = None
            if len(p) == 6:
                st = channel_stats(y) if uses_batch_stats(layer.norm2) else None
                stats2.append(st)
                s2, t2, run2 = forward_scale_shift(layer.norm2, st, adt, p[3:5], npix)
                y = _conv(bn_relu(y, s2, t2, cdt), p[5].to(cdt))
            cfg.running.append([run1, run2])
            if layer.drop_rate > 0 and layer.training:
                cfg.rng_states.append(_rng_state(y.device))
                y = y * _dropout_mask(feat[:, c:c + k], layer.drop_rate)
            else:
                cfg.rng_states.append(None)
            feat[:, c:c + k].copy_(y)
            if batch_stats:     # of y, not of its slice of F (see init_features)
                mean[c:c + k], var[c:c + k] = channel_stats(y)
        save_block(ctx, cfg, stats2, feat, mean, var, params, x.dtype)
        return feat

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return run_backward(ctx, grad_out, "torch", _block_backward)


def _block_backward(cfg: _Ctx, stats2: list, feat: Tensor, mean: Tensor | None, var: Tensor | None,
                    params: Sequence[Tensor | None], needs: Sequence[bool], grad_out: Tensor,
                    x_dtype: torch.dtype) -> list[Tensor | None]:
    """Gradients of the block input and of every layer parameter (see the module docstring)."""
    layers, cdt, k, c0 = cfg.setup.layers, cfg.setup.compute_dtype, cfg.setup.k, cfg.setup.c0
    adt = acc_dtype(cdt)
    grad = torch.empty_like(feat, dtype=adt)
    grad.copy_(grad_out)
    grads: list[Tensor | None] = []
    per_layer, per_needs = cfg.setup.per_layer(params), cfg.setup.per_layer(needs)
    for i in reversed(range(len(layers))):
        layer, c, p, need = layers[i], c0 + i * k, per_layer[i], per_needs[i]
        run1, run2 = cfg.running[i]
        x = feat[:, :c]
        s1, t1, m1, i1 = scale_shift(layer.norm1, *(run1 or (mean[:c], var[:c])), adt, p[0:2])
        u = bn_relu(x, s1, t1, cdt)
        w1, w2 = p[2].to(cdt), p[5].to(cdt) if len(p) == 6 else None
        gy = grad[:, c:c + k]
        if cfg.rng_states[i] is not None:
            gy = gy * _dropout_mask(feat[:, c:c + k], layer.drop_rate, cfg.rng_states[i])
        gy = gy.to(cdt)
        if w2 is not None:
            z = _conv(u, w1)
            s2, t2, m2, i2 = scale_shift(layer.norm2, *(stats2[i] or run2), adt, p[3:5])
            ga, dw2 = _conv_backward(gy, bn_relu(z, s2, t2, cdt), w2, need[5])
            gz, dg2, db2 = bn_relu_backward(z, ga, s2, t2, m2, i2, stats2[i] is not None)
            del ga, z
            gu, dw1 = _conv_backward(gz.to(cdt), u, w1, need[2])
            del gz
            tail = [dw1, dg2, db2, dw2]
        else:
            gu, dw1 = _conv_backward(gy, u, w1, need[2])
            tail = [dw1]
        del u
        gx, dg1, db1 = bn_relu_backward(x, gu, s1, t1, m1, i1, cfg.bs1[i])
        del gu
        grad[:, :c] += gx
        del gx
        grads = [g.to(q.dtype) if g is not None and q is not None and nd else None
                 for g, q, nd in zip([dg1, db1, *tail], p, need)] + grads
    return [grad[:, :c0].to(x_dtype, copy=True), *grads]


def block_forward(x: Tensor, layers: Sequence[nn.Module]) -> Tensor:
    """Run a dense block (``layers`` with ``norm1``/``conv1``[/``norm2``/``conv2``]) on ``x``."""
    setup = BlockSetup.of(x, layers)
    with no_autocast(x):
        return _DenseBlockFunction.apply(_Ctx(setup), x, *setup.params)
