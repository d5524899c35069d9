"""What a run trains: the model's description saved in every checkpoint (:func:`model_spec`), the model built from
it (:func:`build_model`), the backend its blocks run with, and the summary printed at start."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from .. import backends
from ..memory import predicted_activation_bytes
from ..models import MODELS, EfficientDenseNet, densenet_cifar
from .baselines import BASELINES
from .cli import CUSTOM

def model_spec(args: argparse.Namespace, num_classes: int, in_channels: int) -> dict:
    """What :func:`build_model` needs, saved in every checkpoint so ``effdense-eval`` can rebuild the model."""
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if args.arch == CUSTOM:
        kwargs.update(depth=args.depth, growth_rate=args.growth_rate, bottleneck=args.bottleneck)
    for key in ("compression", "drop_rate", "stem"):
        if getattr(args, key, None) is not None:
            kwargs[key] = getattr(args, key)
    return {"arch": args.arch, "kwargs": kwargs}


def build_model(spec: dict, backend: str = "auto") -> nn.Module:
    arch, kwargs = spec["arch"], dict(spec["kwargs"])
    if arch in BASELINES:
        return BASELINES[arch](**kwargs)
    if arch == CUSTOM:
        return densenet_cifar(backend=backend, **kwargs)
    return MODELS[arch](backend=backend, **kwargs)


def block_backend(model: nn.Module, device: torch.device, dtype: torch.dtype) -> backends.Backend | None:
    """The backend the dense blocks run with, or None for a baseline."""
    if not isinstance(model, EfficientDenseNet):
        return None
    return backends.resolve(model.blocks()[0].backend, device, dtype)


def summarize(model: nn.Module, in_channels: int, device: torch.device, batch: int, dtype: torch.dtype,
              size: int = 32) -> str:
    """Parameters, forward FLOPs per ``size`` x ``size`` image (``FlopCounterMode``: 2 per multiply-add) and, for a
    DenseNet, the predicted dense-block activation memory of its backend against ``naive`` at ``batch`` images."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    model_backend = model.blocks()[0].backend if isinstance(model, EfficientDenseNet) else None
    was_training = model.training
    backend = block_backend(model, device, dtype)
    if backend is not None:  # kernel backends are opaque to the FLOP counter; naive computes the same convolutions
        model.set_backend("naive")
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_channels, size, size, device=device))
    finally:
        model.train(was_training)
        if backend is not None:
            model.set_backend(model_backend)
    flops = counter.get_total_flops() / 1e6
    lines = [f"parameters: {params:,}", f"FLOPs per image (forward, {size}x{size}): {flops:.1f} M"]
    if backend is not None:
        kind = "fused" if backend.name == "cpp" else "efficient" if backend.memory_efficient else backend.name
        naive = predicted_activation_bytes(model, batch, size, dtype, "naive")
        mine = predicted_activation_bytes(model, batch, size, dtype, kind, device)
        lines.append(f"dense-block activation memory at batch {batch} (predicted): {mine / 2**20:.1f} MiB with "
                     f"backend {backend.name!r}, {naive / 2**20:.1f} MiB naive ({naive / max(mine, 1):.1f}x)")
    return "\n".join(lines)
