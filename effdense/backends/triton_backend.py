"""``"triton"``: the memory-efficient dense block of docs/DESIGN.md on fused Triton kernels (:mod:`effdense.kernels`).

Same algorithm and statistics as the ``"torch"`` specification (:mod:`.torch_backend`): one feature buffer ``F``,
per-channel statistics computed once when a channel is written, recomputation in backward, one gradient buffer
``G`` accumulated in place. ``F`` and ``G`` are always rows buffers (channels-last, row stride padded to 16
elements, :mod:`effdense.kernels.common`); the input is converted once at block entry and the block returns
the ``[:, :C]`` view of ``F`` (same values, shape and module contract; only the strides differ).

Launches per bottleneck layer (a plain layer has the 3x3 kernel's half of each)
  forward, 4: ``Z = conv1x1(relu(bn1(F[:, :c])))`` with ``Z``'s Welford partials; BN2's finalize (partials
  merged, mean/var, running-statistics update, one program); ``F[:, c:c+k] = dropout(conv3x3(relu(bn2(Z))))``
  with the new channels' partials; their finalize, which also updates the next layer's ``norm1``.
  BN scale/shift are formed in every kernel's prologue from mean/var/gamma/beta, so none is launched for.
  backward, 9: recompute ``Z``; wgrad3x3 and dgrad3x3 (ReLU backward and BN2's partial sums in its epilogue);
  one finalize reducing BN2's sums (``dgamma2``/``dbeta2`` written) and the wgrad split (``dW2`` written);
  the BN2 finish in place over ``g2`` (= ``gZ``); the same four for conv1/BN1, the finish accumulating into
  ``G[:, :c]``.
Per block: the entry kernel (``x`` into ``F``, with ``x``'s partials) and its finalize; in backward the copy of
the output gradient into ``G`` and of ``G[:, :C0]`` out. Workspaces (``Z``, partials, ``gZ``, ``g1``, the wgrad
split) are allocated once per block forward/backward; weights are read in their own layout. Nothing in a
block waits for the device: dropout seeds are one ``torch.randint`` on the device per block, read in-kernel.

With ``--sync-bn`` (:func:`~effdense.backends.bn.enable_sync_stats`) the finalize kernels only merge this process's
partials; the statistics are then merged over every process and the running statistics updated with the
``"torch"`` backend's helpers, and the BN backward's sums are all-reduced before the finish.

Dropout draws a fresh mask from a Philox seed and regenerates it in backward: it is not ``F.dropout``'s mask, so
it matches ``"naive"`` in distribution only (``torch.manual_seed`` makes it reproducible).

Runs on CUDA (fp32/fp16/bf16, autocast included) and, with ``TRITON_INTERPRET=1`` set before ``triton`` is
imported, on CPU tensors in fp32 or fp16 through Triton's interpreter. Under ``torch.compile`` the kernels are
``effdense::`` custom ops (:mod:`effdense.kernels.ops`), and the block compiles with ``fullgraph=True``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import torch_backend
from .base import Backend
from .bn import sync_channel_stats, sync_grad_sums, sync_stats_enabled, update_running_stats, uses_batch_stats
from .common import BlockSetup, compute_dtype, fused_transition, no_autocast, run_backward, save_block

try:
    from .. import kernels as K
    _IMPORT_ERROR: str | None = None
except ImportError as _err:  # triton missing or too old: the backend stays listed, with the reason
    K = None
    _IMPORT_ERROR = f"triton is not importable: {type(_err).__name__}: {_err}"

if K is not None:
    from ..kernels import common as KC, transition as KT, wgrad as KW

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: bfloat16 is broken in Triton's interpreter
INTERPRETER_DTYPES = (torch.float32, torch.float16)
F32 = torch.float32


@dataclass
class _Ctx:
    """Non-tensor arguments of the block function: the block's setup, and what its forward decides per layer."""

    setup: BlockSetup
    drop: list = field(default_factory=list)      # per layer: dropout p (0: none)
    bs1: list = field(default_factory=list)       # per layer: does norm1 normalize with batch statistics
    bs2: list = field(default_factory=list)       # per layer: does norm2


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


def _why_not(device: torch.device, dtype: torch.dtype) -> str | None:
    """:func:`unavailable`, except in a kernel dry run (:func:`effdense.kernels.dry_run`), which runs anywhere."""
    return None if K is not None and KC.dry_running() else unavailable(device, dtype)


class _Kernels:
    """The launchers in eager mode; under ``torch.compile`` the same calls through the ``effdense::`` custom ops
    (:class:`effdense.kernels.ops.Dispatch`), which dynamo treats as opaque."""

    def __getattr__(self, name: str):
        if torch.compiler.is_compiling():
            from ..kernels.ops import Dispatch
            return getattr(Dispatch, name)
        return getattr(K, name)


_K = _Kernels()


def _bn(norm: nn.BatchNorm2d, stats: tuple[Tensor, Tensor] | None, gamma: Tensor | None, beta: Tensor | None):
    """The kernels' view of ``norm``: the batch ``stats`` or, when None, its running statistics."""
    mean, var = stats if stats is not None else (norm.running_mean, norm.running_var)
    return K.BN(mean, var, gamma, beta, norm.eps)


def _finalize(part: Tensor, t: int, m: int, mean: Tensor, var: Tensor, c0: int, norm: nn.BatchNorm2d | None,
              c_upd: int, npix: int) -> None:
    """Channels ``[c0, c0+m)`` of ``mean``/``var`` from the partials, and ``norm``'s running statistics (if given and
    a training forward updates them) from ``[:c_upd]``: one launch, or with ``--sync-bn`` the local merge followed by
    the cross-process merge and the update in PyTorch ops."""
    run = None if norm is None else K.running_args(norm)
    if not sync_stats_enabled():
        _K.bn_finalize(part, t, m, mean, var, c0, run, c_upd, npix)
        return
    _K.bn_finalize(part, t, m, mean, var, c0)
    mu, v = sync_channel_stats(mean[c0:c0 + m], var[c0:c0 + m], npix)
    mean[c0:c0 + m].copy_(mu)
    var[c0:c0 + m].copy_(v)
    if run is not None:
        update_running_stats(norm, mean[:c_upd], var[:c_upd], npix)


def _world_sums(tot: Tensor, c: int, npix: int, batch_stats: bool) -> Tensor:
    """The sums :func:`~effdense.kernels.bn_bwd_apply` divides by this process's ``P``: its own, or with ``--sync-bn``
    the totals over every process rescaled by ``P / P_total``; the parameter gradients stay local."""
    if not (batch_stats and sync_stats_enabled()):
        return tot
    sum_g, sum_gx, total = sync_grad_sums(tot[:c], tot[c:2 * c], npix)
    return torch.cat([sum_g, sum_gx]) * (npix / total)


def _stat_rows(n: int, h: int, w: int) -> int:
    """Partial rows any config of any block kernel writes, at most (64-pixel tiles, flat or 8x8 / 16x4)."""
    return max(_cdiv(n * h * w, 64), KC.halo_tiles(n, h, w, 8, 8), KC.halo_tiles(n, h, w, 16, 4))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _TritonBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: _Ctx, x: Tensor, *params: Tensor) -> Tensor:
        s = cfg.setup
        layers, cdt, k, width, bottleneck = s.layers, s.compute_dtype, s.k, s.width, s.bottleneck
        n, c0, h, w = x.shape
        npix, nl, dev = n * h * w, len(layers), x.device
        cfg.bs1 = [uses_batch_stats(layer.norm1) for layer in layers]
        cfg.bs2 = [bottleneck and uses_batch_stats(layer.norm2) for layer in layers]
        cfg.drop = [layer.drop_rate if layer.drop_rate > 0 and layer.training else 0.0 for layer in layers]
        batch, sync = any(cfg.bs1), sync_stats_enabled()
        feat = K.rows_buffer(n, h, w, c0 + nl * k, cdt, dev)
        part = K.partials(_stat_rows(n, h, w), max(c0, width, k), dev) if batch or any(cfg.bs2) else None
        mean = torch.empty(K.padded(feat.shape[3]), dtype=F32, device=dev) if batch else None
        var = torch.empty_like(mean) if batch else None
        stats2 = torch.empty(nl, 2, K.padded(width), dtype=F32, device=dev) if any(cfg.bs2) else None
        seeds = torch.randint(0, 2 ** 31 - 1, (nl,), device=dev) if any(cfg.drop) else None
        z = K.rows_buffer(n, h, w, width, cdt, dev) if bottleneck else None
        t = _K.block_entry(x, feat, part if batch else None)
        if batch:
            _finalize(part, t, c0, mean, var, 0, layers[0].norm1 if cfg.bs1[0] else None, c0, npix)
        for i, (layer, p) in enumerate(zip(layers, s.per_layer(params))):
            c = c0 + i * k
            bn1 = _bn(layer.norm1, (mean, var) if cfg.bs1[i] else None, p[0], p[1])
            # the last layer's channels feed no later BN; with --sync-bn every process still merges them, as the
            # "torch" backend does (an empty process runs it and must meet the same collectives)
            new_part = part if batch and (i < nl - 1 or sync) else None
            if bottleneck:
                t = _K.bn_relu_conv_fwd(feat, c, bn1, p[2], z, 0, part if cfg.bs2[i] else None)
                if cfg.bs2[i]:
                    _finalize(part, t, width, stats2[i, 0], stats2[i, 1], 0, layer.norm2, width, npix)
                bn2 = _bn(layer.norm2, (stats2[i, 0], stats2[i, 1]) if cfg.bs2[i] else None, p[3], p[4])
                t = _K.bn_relu_conv_fwd(z, width, bn2, p[5], feat, c, new_part, cfg.drop[i], seeds, i)
            else:
                t = _K.bn_relu_conv_fwd(feat, c, bn1, p[2], feat, c, new_part, cfg.drop[i], seeds, i)
            if new_part is not None:
                nxt = layers[i + 1].norm1 if i < nl - 1 and cfg.bs1[i + 1] else None
                _finalize(part, t, k, mean, var, c, nxt, c + k, npix)
        out = K.nchw(feat, 0, c0 + nl * k)
        # the output view is saved, not feat: under torch.compile a saved intermediate may not alias an output
        save_block(ctx, cfg, (stats2, seeds), out, mean, var, params, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return run_backward(ctx, grad_out, "triton", _block_backward)


@dataclass
class _Work:
    """A block backward's workspaces, allocated once: partials of the dgrad sums, their totals, the weight-gradient
    split partials, and (bottleneck) the recomputed ``Z`` and ``g2``/``gZ``; ``g1`` per layer from one buffer."""

    part: Tensor
    tot: Tensor
    dwp: Tensor
    z: Tensor | None
    g2: Tensor | None
    g1: Tensor

    def g1_rows(self, n: int, h: int, w: int, c: int) -> Tensor:
        return self.g1[:n * h * w * K.padded(c)].view(n, h, w, K.padded(c))


def _workspaces(cfg: _Ctx, feat: Tensor, width: int, needs: list) -> _Work:
    n, h, w, _ = feat.shape
    s, dev = cfg.setup, feat.device
    layers, k, cdt, c0 = s.layers, s.k, s.compute_dtype, s.c0
    c_last = K.padded(layers[-1].norm1.num_features)      # the widest layer input
    dw = 1
    for i, need in enumerate(needs):      # the largest weight-gradient split of any layer
        c = c0 + i * k
        shapes = [(3, width, k, need[5]), (1, c, width, need[2])] if s.bottleneck else [(3, c, k, need[2])]
        for ks, cin, cout, nd in shapes:
            if nd:
                dw = max(dw, KW.plan(ks, feat, cin, cout)[1] * cout * cin * ks * ks)
    return _Work(part=K.partials(_stat_rows(n, h, w), max(c_last, width), dev),
                 tot=torch.empty(2 * max(c_last, width), dtype=F32, device=dev),
                 dwp=torch.empty(dw, dtype=F32, device=dev),
                 z=K.rows_buffer(n, h, w, width, cdt, dev) if s.bottleneck else None,
                 g2=K.rows_buffer(n, h, w, width, F32, dev) if s.bottleneck else None,
                 g1=torch.empty(n * h * w * c_last, dtype=F32, device=dev))


def _conv_backward(ws: _Work, gy: Tensor, gy_c0: int, x: Tensor, cin: int, bn, w: Tensor, g: Tensor,
                   batch_stats: bool, need_w: bool, drop: float = 0.0, seeds: Tensor | None = None, idx: int = 0,
                   out: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One conv + BN-ReLU backward, 4 launches: wgrad (if ``need_w``), dgrad, the finalize (dW, dgamma, dbeta),
    the finish (into ``out`` accumulating, or in place over ``g``). Returns ``(dgamma, dbeta, dW)``."""
    cout, ks = w.shape[0], w.shape[-1]
    n, h, wd, _ = x.shape
    npix = n * h * wd
    dwp = dw = None
    if need_w:
        _, s = KW.plan(ks, x, cin, cout)
        dwp = _K.conv_wgrad(gy, gy_c0, x, cin, bn, ks, cout, ws.dwp, drop, seeds, idx, splits=s)[0]
        dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)     # contiguous: the finalize writes it so
    t = _K.conv_dgrad_bn_relu(gy, gy_c0, w, x, bn, g, ws.part, drop, seeds, idx)
    dgamma = torch.empty_like(bn.gamma) if bn.affine else None
    dbeta = torch.empty_like(bn.beta) if bn.affine else None
    _K.bn_bwd_finalize(ws.part, t, cin, ws.tot, dgamma, dbeta, dwp, dw)
    tot = _world_sums(ws.tot, cin, npix, batch_stats)
    _K.bn_bwd_apply(g, x, cin, bn, tot, batch_stats, out, out is not None)
    return dgamma, dbeta, dw


def _block_backward(cfg: _Ctx, saved: tuple, feat: Tensor, mean: Tensor | None, var: Tensor | None,
                    params: Sequence[Tensor | None], needs: Sequence[bool], grad_out: Tensor,
                    x_dtype: torch.dtype) -> list[Tensor | None]:
    """Gradients of the block input and of every layer parameter (see the module docstring)."""
    stats2, seeds = saved
    feat = K.as_rows(feat)          # the block output, back to its rows buffer
    s = cfg.setup
    layers, k, c0, width = s.layers, s.k, s.c0, s.width
    n, h, w, _ = feat.shape
    nl = len(layers)
    grad = K.rows_buffer(n, h, w, c0 + nl * k, F32, feat.device)
    K.nchw(grad, 0, c0 + nl * k).copy_(grad_out)
    per_layer, per_needs = s.per_layer(params), s.per_layer(needs)
    ws = _workspaces(cfg, feat, width, per_needs)
    grads: list[Tensor | None] = []
    for i in reversed(range(nl)):
        layer, c, p, need = layers[i], c0 + i * k, per_layer[i], per_needs[i]
        bn1 = _bn(layer.norm1, (mean, var) if cfg.bs1[i] else None, p[0], p[1])
        g1 = ws.g1_rows(n, h, w, c)
        if s.bottleneck:
            _K.bn_relu_conv_fwd(feat, c, bn1, p[2], ws.z, 0)                 # recompute Z (no statistics)
            bn2 = _bn(layer.norm2, (stats2[i, 0], stats2[i, 1]) if cfg.bs2[i] else None, p[3], p[4])
            dg2, db2, dw2 = _conv_backward(ws, grad, c, ws.z, width, bn2, p[5], ws.g2, cfg.bs2[i], need[5],
                                           cfg.drop[i], seeds, i)           # g2 becomes gZ in place
            dg1, db1, dw1 = _conv_backward(ws, ws.g2, 0, feat, c, bn1, p[2], g1, cfg.bs1[i], need[2], out=grad)
            got = [dg1, db1, dw1, dg2, db2, dw2]
        else:
            dg1, db1, dw1 = _conv_backward(ws, grad, c, feat, c, bn1, p[2], g1, cfg.bs1[i], need[2], cfg.drop[i],
                                           seeds, i, out=grad)
            got = [dg1, db1, dw1]
        grads = [g if nd else None for g, nd in zip(got, need)] + grads
    dx = K.rows_buffer(n, h, w, c0, x_dtype, feat.device)
    K.nchw(dx, 0, c0).copy_(K.nchw(grad, 0, c0))
    return [K.nchw(dx, 0, c0), *grads]


def block_forward(x: Tensor, layers: Sequence[nn.Module]) -> Tensor:
    """Run a dense block on the Triton kernels (same contract as :func:`.torch_backend.block_forward`); the output
    is the ``[:, :C]`` view of a padded channels-last buffer."""
    setup = BlockSetup.of(x, layers)
    if x.numel() == 0 or _interpreter_fallback(x.device, setup.compute_dtype):
        # nothing for a kernel to do (the empty batch), or bf16 in the interpreter: the specification runs it
        return torch_backend.block_forward(x, layers)
    _check_runs(x.device, setup.compute_dtype)
    with no_autocast(x):
        return _TritonBlockFunction.apply(_Ctx(setup), x, *setup.params)


def _interpreter_fallback(device: torch.device, cdt: torch.dtype) -> bool:
    """Whether a CPU call under Triton's interpreter runs in PyTorch instead: the interpreter lacks ``cdt`` (bf16
    autocast, a debugging/CI mode)."""
    return device.type == "cpu" and K is not None and K.interpreting() and _why_not(device, cdt) is not None


def _check_runs(device: torch.device, cdt: torch.dtype) -> None:
    why = _why_not(device, cdt)
    if why is not None:
        raise RuntimeError(f"backend 'triton' cannot run on {device} with compute dtype {cdt}: {why}")


class _TritonTransitionFunction(torch.autograd.Function):
    """``conv1x1(avgpool2x2(relu(bn(x))))`` on :mod:`effdense.kernels.transition`. Forward: the statistics
    partials of ``x`` (:func:`~effdense.kernels.block_entry` without the copy), their finalize (running
    statistics updated in the same launch), the fused kernel: 3 launches. Backward: wgrad, dgrad (pool, ReLU and
    BN sums in its epilogue), the finalize (dW, dgamma, dbeta), the finish: 4. Saves ``x`` and two vectors."""

    @staticmethod
    def forward(ctx, norm: nn.BatchNorm2d, cdt: torch.dtype, x: Tensor, gamma: Tensor | None, beta: Tensor | None,
                weight: Tensor) -> Tensor:
        n, c, h, w = x.shape
        npix, dev = n * h * w, x.device
        xb = K.to_rows(x, cdt)
        batch = uses_batch_stats(norm)
        mean = var = None
        if batch:
            part = K.partials(_cdiv(npix, 64), c, dev)
            mean = torch.empty(K.padded(c), dtype=F32, device=dev)
            var = torch.empty_like(mean)
            t = _K.block_entry(K.nchw(xb, 0, c), None, part)
            _K.bn_finalize(part, t, c, mean, var, 0, K.running_args(norm), c, npix)
        bn = _bn(norm, (mean, var) if batch else None, gamma, beta)
        y = K.rows_buffer(n, h // 2, w // 2, weight.shape[0], cdt, dev)
        _K.transition_fwd(xb, c, bn, weight, y)
        ctx.save_for_backward(xb, bn.mean, bn.var, gamma, beta, weight)
        ctx.batch, ctx.eps, ctx.x_dtype = batch, norm.eps, x.dtype
        return K.nchw(y, 0, weight.shape[0])

    @staticmethod
    def backward(ctx, gy: Tensor):
        xb, mean, var, gamma, beta, weight = ctx.saved_tensors
        need_x, need_g, need_b, need_w = ctx.needs_input_grad[2:6]
        n, h, w, _ = xb.shape
        c, cout, dev = weight.shape[1], weight.shape[0], xb.device
        bn = K.BN(mean, var, gamma, beta, ctx.eps)
        dx = dw = dwp = None
        with torch.autocast(gy.device.type, enabled=False):
            gyb = K.to_rows(gy)
            if need_w:
                _, s = KT.wgrad_plan(xb, c, cout)
                dwp = _K.transition_wgrad(gyb, xb, c, bn, cout, torch.empty(s * cout * c, dtype=F32, device=dev),
                                          splits=s)[0]
                dw = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
            part = K.partials(KT.dgrad_tiles(xb, KT.dgrad_heuristic(cout, c)), c, dev)
            g = K.rows_buffer(n, h, w, c, F32, dev)
            t = _K.transition_dgrad(gyb, weight, xb, bn, g, part)
            dgamma = torch.empty_like(gamma) if gamma is not None else None
            dbeta = torch.empty_like(beta) if beta is not None else None
            tot = torch.empty(2 * c, dtype=F32, device=dev)
            _K.bn_bwd_finalize(part, t, c, tot, dgamma, dbeta, dwp, dw)
            if need_x:
                dxb = K.rows_buffer(n, h, w, c, ctx.x_dtype, dev)
                _K.bn_bwd_apply(g, xb, c, bn, tot, ctx.batch, dxb, False)
                dx = K.nchw(dxb, 0, c)
        return None, None, dx, dgamma if need_g else None, dbeta if need_b else None, dw


def _fused_transition(x: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d, cdt: torch.dtype) -> Tensor:
    _check_runs(x.device, cdt)
    return _TritonTransitionFunction.apply(norm, cdt, x, norm.weight, norm.bias, conv.weight)


def transition_forward(x: Tensor, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
    """DenseNet transition ``conv1x1(avgpool2x2(relu(norm(x))))`` (``effdense.models.Transition``) on the fused
    Triton kernels, with ``norm``'s batch statistics (updating its running ones once) in training mode and its
    running statistics in eval mode; the conv runs in the autocast dtype when autocast is on. The cases the kernels
    do not cover run in PyTorch (:func:`~.common.fused_transition`), as does bf16 in the interpreter."""
    return fused_transition(x, norm, conv, _fused_transition,
                            fallback=_interpreter_fallback(x.device, compute_dtype(x)))


BACKEND = Backend("triton", "fused BN-ReLU-Conv Triton kernels on the shared feature buffer (GPU; CPU through "
                  "TRITON_INTERPRET=1)", True, block_forward, _why_not,
                  auto_devices=("cuda",), sync_stats=True, transition=transition_forward)
