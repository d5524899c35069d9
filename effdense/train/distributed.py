"""Processes and devices: ``torchrun``'s process group (gloo on CPU, nccl on CUDA), ``--device``, ``--sync-bn``
(every batch norm's statistics over all processes) and the check that DDP kept the replicas identical."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import backends
from ..backends import bn

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def parse_device(name: str | None) -> torch.device:
    """``--device`` (default: cuda if available, else cpu), with a one-line ``ValueError`` for a name torch does not
    know, a device type effdense does not run on, or a CUDA device this machine lacks."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: effdense runs on cpu and cuda devices, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def setup(args: argparse.Namespace) -> tuple[Dist, torch.device]:
    """Device and process group: ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; gloo on CPU, nccl on
    CUDA."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        device = parse_device(args.device)
    except ValueError as err:
        raise SystemExit(f"effdense-train: {err}") from None
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world), device


def convert_sync_bn(model: nn.Module, device: torch.device, backend: backends.Backend | None) -> nn.Module:
    """Make every batch norm compute its statistics over all processes (:func:`effdense.backends.bn.enable_sync_stats`):
    the BN modules (stem, transitions, ``norm5``, and the dense layers of ``naive``/``checkpoint``) become
    ``nn.SyncBatchNorm`` on CUDA and :class:`~effdense.backends.bn.SyncBatchNorm2d` on CPU, and the memory-efficient
    blocks' shared statistics span the process group."""
    bn.enable_sync_stats()
    if backend is not None:
        try:   # "auto" now resolves to a backend with cross-process statistics; a named one may have none
            backends.resolve(model.blocks()[0].backend, device, torch.float32)
        except RuntimeError as err:
            bn.disable_sync_stats()
            raise NotImplementedError(f"--sync-bn: {err}") from None
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return bn.convert_sync_batchnorm(model)


def check_replicas(model: nn.Module, ctx_dist: Dist, say) -> None:
    """Fail unless every process holds the same parameters (what DDP promises)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not same.item():
        raise RuntimeError("parameters differ between processes after training")
    say(f"parameters identical on all {ctx_dist.world} processes")
