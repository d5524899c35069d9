"""The launchers as ``torch.library`` custom ops (``effdense::*``) with fake implementations, so ``torch.compile``
(``fullgraph=True``) and ``torch.export`` trace through them as opaque ops, and ``torch.library.opcheck`` checks them.

``custom_op`` + ``register_fake`` rather than ``triton_op``/``wrap_triton``: the launchers pick configs by
heuristic and must also run through Triton's CPU interpreter, which ``wrap_triton`` does not cover. Every op
writes into buffers it is given (``mutates_args``) and returns nothing: the big ones are the feature and
gradient rows buffers *as whole tensors* (never a view of them), with the column range as ints, so
functionalization sees one base per mutation and inductor's reinplacing can update ``F``/``G`` in place instead
of cloning them per layer. The BN is passed unpacked (``mean, var, gamma, beta, eps``) and a BatchNorm's running
statistics as the tensors they are. The ops carry no autograd formula: they are the pieces of the block's
hand-written ``autograd.Function``, which calls them through the launcher-compatible wrappers below only under
``torch.compile`` (:mod:`effdense.backends.triton_backend`) and the launchers directly in eager mode.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import bn_bwd, dgrad, fwd, stats, transition, wgrad
from .common import BN

_OPS = "effdense::"


def _bn(mean, var, gamma, beta, eps) -> BN:
    return BN(mean, var, gamma, beta, eps)


def _fake(op):
    op.register_fake(lambda *args, **kwargs: None)
    return op


# --------------------------------------------------------------------------------------------- statistics
@torch.library.custom_op(_OPS + "block_entry", mutates_args=("out", "part"))
def block_entry_op(x: Tensor, out: Optional[Tensor], part: Optional[Tensor]) -> None:
    stats.block_entry(x, out, part)


@torch.library.custom_op(_OPS + "bn_finalize", mutates_args=("mean", "var", "rmean", "rvar", "nbt"))
def bn_finalize_op(part: Tensor, t: int, m: int, mean: Tensor, var: Tensor, c0: int, rmean: Optional[Tensor],
                   rvar: Optional[Tensor], nbt: Optional[Tensor], momentum: float, c_upd: int, npix: int) -> None:
    running = None if rmean is None else (rmean, rvar, nbt, momentum)
    stats.bn_finalize(part, t, m, mean, var, c0, running, c_upd, npix)


# --------------------------------------------------------------------------------------------- block GEMMs
@torch.library.custom_op(_OPS + "bn_relu_conv_fwd", mutates_args=("out", "part"))
def bn_relu_conv_fwd_op(x: Tensor, cin: int, mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                        beta: Optional[Tensor], eps: float, w: Tensor, out: Tensor, out_c0: int, part: Optional[Tensor],
                        drop_p: float, seeds: Optional[Tensor], seed_idx: int) -> None:
    fwd.bn_relu_conv_fwd(x, cin, _bn(mean, var, gamma, beta, eps), w, out, out_c0, part, drop_p, seeds, seed_idx)


@torch.library.custom_op(_OPS + "conv_dgrad_bn_relu", mutates_args=("g", "part"))
def conv_dgrad_bn_relu_op(gy: Tensor, gy_c0: int, w: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                          gamma: Optional[Tensor], beta: Optional[Tensor], eps: float, g: Tensor, part: Tensor,
                          drop_p: float, seeds: Optional[Tensor], seed_idx: int) -> None:
    dgrad.conv_dgrad_bn_relu(gy, gy_c0, w, x, _bn(mean, var, gamma, beta, eps), g, part, drop_p, seeds, seed_idx)


@torch.library.custom_op(_OPS + "conv_wgrad", mutates_args=("part",))
def conv_wgrad_op(gy: Tensor, gy_c0: int, x: Tensor, cin: int, mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                  beta: Optional[Tensor], eps: float, ks: int, cout: int, part: Tensor, drop_p: float,
                  seeds: Optional[Tensor], seed_idx: int, splits: int) -> None:
    wgrad.conv_wgrad(gy, gy_c0, x, cin, _bn(mean, var, gamma, beta, eps), ks, cout, part, drop_p, seeds, seed_idx,
                     splits=splits)


# --------------------------------------------------------------------------------------------- BN backward
@torch.library.custom_op(_OPS + "bn_bwd_finalize", mutates_args=("tot", "dgamma", "dbeta", "dw"))
def bn_bwd_finalize_op(part: Tensor, t: int, c: int, tot: Tensor, dgamma: Optional[Tensor], dbeta: Optional[Tensor],
                       dw_part: Optional[Tensor], dw: Optional[Tensor]) -> None:
    bn_bwd.bn_bwd_finalize(part, t, c, tot, dgamma, dbeta, dw_part, dw)


@torch.library.custom_op(_OPS + "bn_bwd_apply", mutates_args=("g", "out"))
def bn_bwd_apply_op(g: Tensor, x: Tensor, c: int, mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                    beta: Optional[Tensor], eps: float, tot: Tensor, batch_stats: bool, out: Optional[Tensor],
                    accumulate: bool) -> None:
    bn_bwd.bn_bwd_apply(g, x, c, _bn(mean, var, gamma, beta, eps), tot, batch_stats, out, accumulate)


# --------------------------------------------------------------------------------------------- transition
@torch.library.custom_op(_OPS + "transition_fwd", mutates_args=("out",))
def transition_fwd_op(x: Tensor, cin: int, mean: Tensor, var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                      eps: float, w: Tensor, out: Tensor) -> None:
    transition.transition_fwd(x, cin, _bn(mean, var, gamma, beta, eps), w, out)


@torch.library.custom_op(_OPS + "transition_dgrad", mutates_args=("g", "part"))
def transition_dgrad_op(gy: Tensor, w: Tensor, x: Tensor, mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                        beta: Optional[Tensor], eps: float, g: Tensor, part: Tensor) -> None:
    transition.transition_dgrad(gy, w, x, _bn(mean, var, gamma, beta, eps), g, part)


@torch.library.custom_op(_OPS + "transition_wgrad", mutates_args=("part",))
def transition_wgrad_op(gy: Tensor, x: Tensor, cin: int, mean: Tensor, var: Tensor, gamma: Optional[Tensor],
                        beta: Optional[Tensor], eps: float, cout: int, part: Tensor, splits: int) -> None:
    transition.transition_wgrad(gy, x, cin, _bn(mean, var, gamma, beta, eps), cout, part, splits=splits)


for _op in (block_entry_op, bn_finalize_op, bn_relu_conv_fwd_op, conv_dgrad_bn_relu_op, conv_wgrad_op,
            bn_bwd_finalize_op, bn_bwd_apply_op, transition_fwd_op, transition_dgrad_op, transition_wgrad_op):
    _fake(_op)


# ---------------------------------------------------------------------- launcher-compatible entry points
def _unpack(bn: BN) -> tuple:
    return bn.mean, bn.var, bn.gamma, bn.beta, float(bn.eps)


class Dispatch:
    """The launchers' signatures (as :mod:`effdense.backends.triton_backend` calls them) through the ops."""

    @staticmethod
    def block_entry(x, out, part):
        torch.ops.effdense.block_entry(x, out, part)
        return stats.entry_tiles(x)

    @staticmethod
    def bn_finalize(part, t, m, mean, var, c0=0, running=None, c_upd=0, npix=0):
        rm, rv, nbt, momentum = running if running is not None else (None, None, None, 0.0)
        torch.ops.effdense.bn_finalize(part, t, m, mean, var, c0, rm, rv, nbt, momentum, c_upd, npix)

    @staticmethod
    def bn_relu_conv_fwd(x, cin, bn, w, out, out_c0=0, part=None, drop_p=0.0, seeds=None, seed_idx=0):
        torch.ops.effdense.bn_relu_conv_fwd(x, cin, *_unpack(bn), w, out, out_c0, part, float(drop_p), seeds,
                                            seed_idx)
        n, h, wd, _ = x.shape
        ks, cout = w.shape[-1], w.shape[0]
        return fwd.tiles(ks, n, h, wd, fwd.heuristic(ks, n, h, wd, cin, cout, x.dtype))

    @staticmethod
    def conv_dgrad_bn_relu(gy, gy_c0, w, x, bn, g, part, drop_p=0.0, seeds=None, seed_idx=0):
        torch.ops.effdense.conv_dgrad_bn_relu(gy, gy_c0, w, x, *_unpack(bn), g, part, float(drop_p), seeds, seed_idx)
        n, h, wd, _ = x.shape
        ks, cout, cin = w.shape[-1], w.shape[0], w.shape[1]
        return dgrad.tiles(ks, n, h, wd, dgrad.heuristic(ks, n, h, wd, cout, cin, x.dtype))

    @staticmethod
    def conv_wgrad(gy, gy_c0, x, cin, bn, ks, cout, part, drop_p=0.0, seeds=None, seed_idx=0, splits=1):
        torch.ops.effdense.conv_wgrad(gy, gy_c0, x, cin, *_unpack(bn), ks, cout, part, float(drop_p), seeds, seed_idx,
                                      splits)
        m = cout * cin * ks * ks
        return part[:splits * m].view(splits, m), splits

    @staticmethod
    def bn_bwd_finalize(part, t, c, tot, dgamma, dbeta, dw_part=None, dw=None):
        torch.ops.effdense.bn_bwd_finalize(part, t, c, tot, dgamma, dbeta, dw_part, dw)

    @staticmethod
    def bn_bwd_apply(g, x, c, bn, tot, batch_stats, out=None, accumulate=False):
        torch.ops.effdense.bn_bwd_apply(g, x, c, *_unpack(bn), tot, batch_stats, out, accumulate)

    @staticmethod
    def transition_fwd(x, cin, bn, w, out):
        torch.ops.effdense.transition_fwd(x, cin, *_unpack(bn), w, out)

    @staticmethod
    def transition_dgrad(gy, w, x, bn, g, part):
        torch.ops.effdense.transition_dgrad(gy, w, x, *_unpack(bn), g, part)
        return transition.dgrad_tiles(x, transition.dgrad_heuristic(w.shape[0], w.shape[1]))

    @staticmethod
    def transition_wgrad(gy, x, cin, bn, cout, part, splits):
        torch.ops.effdense.transition_wgrad(gy, x, cin, *_unpack(bn), cout, part, splits)
        return part[:splits * cout * cin].view(splits, cout * cin), splits
