"""DenseNet models (Huang et al., 2017) on :class:`~effdense.block.EfficientDenseBlock`.

``state_dict`` keys are torchvision's (``features.conv0``, ``features.norm0``, ``features.denseblock{i}``,
``features.transition{i}.{norm,conv}``, ``features.norm5``, ``classifier``), so a torchvision DenseNet
checkpoint loads unchanged into the ImageNet-stem models. The CIFAR stem is the paper's single 3x3
convolution (16 channels for plain DenseNet, ``2k`` with bottlenecks), kept under the same names.

Older key spellings load too (:meth:`EfficientDenseNet._load_from_state_dict`): the legacy ``norm.1``/``conv.1``
keys of torchvision's published ``densenet*.pth`` files and gpleiss/efficient_densenet_pytorch's
``features.norm_final``. Every constructor takes ``weights=PATH`` (:func:`effdense.weights.load_weights`): a file
only, never a download.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .backends.common import torch_transition
from .block import EfficientDenseBlock, exporting
from .memory import bottleneck_plan
from .weights import rename_legacy_keys, with_weights


class Transition(nn.Sequential):
    """torchvision's ``_Transition``: BN-ReLU-Conv1x1-AvgPool2x2 (same module names), computed pooling first
    (:func:`effdense.backends.common.torch_transition`: exact, a quarter of the convolution's work), or by the
    backend's fused transition where it has one."""

    def __init__(self, num_input_features: int, num_output_features: int, backend: str = "auto") -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.backend = backends.check_name(backend)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # torch_transition in TorchScript, pooling first; see EfficientDenseBlock.forward
            return self.conv(self.pool(self.relu(self.norm(x))))
        return self._eager(x)

    @torch.jit.unused
    def _eager(self, x: Tensor) -> Tensor:
        fused = None
        if self.backend != "naive" and not exporting():  # export: standard ops, see EfficientDenseBlock.forward
            fused = backends.resolve(self.backend, x.device, x.dtype).transition
        if fused is not None:
            return fused(x, self.norm, self.conv)
        return torch_transition(x, self.norm, self.conv)


class EfficientDenseNet(nn.Module):
    """DenseNet-BC (default), DenseNet-B, DenseNet-C or plain DenseNet.

    Args:
        growth_rate: ``k``, channels each layer adds.
        block_config: layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width multiplier (the 1x1 conv has ``bn_size * k`` channels).
        compression: transition reduction ``theta``: a transition maps ``m`` channels to ``floor(theta*m)``.
        drop_rate: dropout after each dense layer.
        num_classes: classifier outputs.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"cifar"`` (one 3x3 conv).
        backend: dense-block implementation, see :mod:`effdense.backends`.
        bottleneck: ``False`` for the paper's plain BN-ReLU-Conv3x3 layer.
        include_top: ``False`` drops the classifier; the model then returns features (Keras-style).
        global_pool: ``"avg"``, ``"max"`` or ``None`` (with ``include_top=False``: return the feature map).
        in_channels: input image channels.
        memory_efficient: torchvision's flag; ``True`` selects the ``"checkpoint"`` backend.
        keep_bottleneck: ``"auto"``: the ``"cpp"`` backend keeps the bottlenecks of the blocks where that does not
            raise a training step's peak memory (:func:`effdense.memory.bottleneck_plan`: the later, smaller
            blocks) and recomputes the others in backward; ``True``/``False``: in every block / in none.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, compression: float = 0.5,
                 drop_rate: float = 0.0, num_classes: int = 1000, stem: str = "imagenet",
                 backend: str = "auto", bottleneck: bool = True, include_top: bool = True,
                 global_pool: str | None = "avg", in_channels: int = 3, memory_efficient: bool = False,
                 keep_bottleneck: bool | str = "auto") -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if global_pool not in ("avg", "max", None):
            raise ValueError(f"global_pool must be 'avg', 'max' or None, got {global_pool!r}")
        if include_top and global_pool is None:
            raise ValueError("include_top=True needs global_pool 'avg' or 'max'")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if not block_config or any(not isinstance(n, int) or n < 1 for n in block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive ints, got {block_config!r}")
        if keep_bottleneck not in (True, False, "auto"):
            raise ValueError(f"keep_bottleneck must be True, False or 'auto', got {keep_bottleneck!r}")
        if memory_efficient and backend == "auto":
            backend = "checkpoint"
        backends.check_name(backend)
        self.global_pool = global_pool
        self.include_top = include_top
        if stem == "imagenet":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3,
                                          bias=False)),
                      ("norm0", nn.BatchNorm2d(num_init_features)),
                      ("relu0", nn.ReLU(inplace=True)),
                      ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        else:
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(layers))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = EfficientDenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate,
                                        bottleneck=bottleneck, backend=backend)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = block.num_output_features
            if i != len(block_config) - 1:
                out = int(math.floor(num_features * compression))
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out, backend))
                num_features = out
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        plan = bottleneck_plan(self) if keep_bottleneck == "auto" else [keep_bottleneck] * len(block_config)
        for block, keep in zip(self.blocks(), plan):
            block.keep_bottleneck = bool(keep and bottleneck)
        self.num_features = num_features
        if include_top:
            self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # before any child module reads its keys (torch loads parents first): official torchvision and
        # gpleiss/efficient_densenet_pytorch files then load strictly, like torchvision's own _load_state_dict
        rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def blocks(self) -> list[EfficientDenseBlock]:
        return [m for m in self.modules() if isinstance(m, EfficientDenseBlock)]

    def set_backend(self, backend: str) -> EfficientDenseNet:
        """Switch every dense block to ``backend``; parameters and buffers are untouched."""
        backends.check_name(backend)
        for m in self.modules():
            if isinstance(m, (EfficientDenseBlock, Transition)):
                m.backend = backend
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map after ``norm5`` and ReLU: ``[N, num_features, H/32, W/32]`` (ImageNet stem)."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        return F.relu(self.features(x), inplace=True)

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected a 4-D image batch [N, {self.features.conv0.in_channels}, H, W], got {shape}")
        if not torch.jit.is_tracing() and x.shape[1] != self.features.conv0.in_channels:  # traced: conv0 checks
            raise ValueError(f"expected {self.features.conv0.in_channels} input channels, got {x.shape[1]} "
                             f"in shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image batch, got {x.dtype}")
        param = self.features.conv0.weight
        if x.device != param.device:
            raise ValueError(f"expected the input on {param.device}, where the model's parameters are, got it on "
                             f"{x.device}")
        if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"expected a {param.dtype} input (the model's parameter dtype), got {x.dtype}; cast "
                            f"one of them (model.to({x.dtype}) or x.to({param.dtype})), or run under torch.autocast")

    def forward(self, x: Tensor) -> Tensor:
        out = self.forward_features(x)
        if self.global_pool is None:
            return out
        if self.global_pool == "avg":
            out = F.adaptive_avg_pool2d(out, (1, 1))
        else:
            # a max pool over the whole map: adaptive_max_pool2d's value and gradient, and an operator that torch
            # 2.11's ONNX exporter translates (it has no adaptive_max_pool2d)
            out = F.max_pool2d(out, kernel_size=out.shape[-2:])
        out = torch.flatten(out, 1)
        if hasattr(self, "classifier"):  # include_top (TorchScript: a model without one has no such attribute)
            out = self.classifier(out)
        return out


#: the ImageNet DenseNets (Huang et al., table 1): growth rate k, layers per dense block, stem channels
IMAGENET_CONFIGS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}


def _imagenet(arch: str, weights=None, **kwargs) -> EfficientDenseNet:
    growth_rate, block_config, num_init_features = IMAGENET_CONFIGS[arch]
    model = EfficientDenseNet(growth_rate=growth_rate, block_config=block_config,
                              num_init_features=num_init_features, **kwargs)
    return with_weights(model, weights, arch)


def densenet121(**kwargs) -> EfficientDenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16), torchvision's layout; ``weights="densenet121-a639ec97.pth"`` loads
    torchvision's ImageNet file (see :func:`effdense.weights.load_weights`)."""
    return _imagenet("densenet121", **kwargs)


def densenet161(**kwargs) -> EfficientDenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels)."""
    return _imagenet("densenet161", **kwargs)


def densenet169(**kwargs) -> EfficientDenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _imagenet("densenet169", **kwargs)


def densenet201(**kwargs) -> EfficientDenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _imagenet("densenet201", **kwargs)


def densenet264(**kwargs) -> EfficientDenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48)."""
    return _imagenet("densenet264", **kwargs)


def densenet_depth(block_config: Sequence[int], bottleneck: bool = True) -> int:
    """A DenseNet's depth: its layers' convolutions (two with bottlenecks), the stem, the transitions and the
    classifier (121 for DenseNet-121's blocks 6-12-24-16)."""
    return sum(block_config) * (2 if bottleneck else 1) + len(block_config) + 1


def cifar_block_config(depth: int, bottleneck: bool = True, num_blocks: int = 3) -> tuple[int, ...]:
    """Layers per block for a CIFAR DenseNet of total ``depth``: ``depth = 3N + 4`` (plain) or ``6N + 4``
    (bottleneck layers hold two convolutions); the 4 are the stem conv, two transitions and the classifier."""
    per_layer = 2 if bottleneck else 1
    step = num_blocks * per_layer
    extra = num_blocks + 1
    if not isinstance(depth, int) or depth < extra + step or (depth - extra) % step:
        kind = "DenseNet-BC/B (bottleneck)" if bottleneck else "plain DenseNet"
        first = ", ".join(str(extra + step * n) for n in range(1, 5))
        raise ValueError(f"depth {depth!r} does not fit a {kind} with {num_blocks} blocks: depth must be "
                         f"{step}*N + {extra} for N >= 1 ({first}, ...)")
    return ((depth - extra) // step,) * num_blocks


def densenet_cifar(depth: int = 100, growth_rate: int = 12, bottleneck: bool = True,
                   compression: float | None = None, drop_rate: float = 0.0, num_classes: int = 10,
                   num_init_features: int | None = None, weights=None, **kwargs) -> EfficientDenseNet:
    """A CIFAR DenseNet (three blocks on 32x32 inputs): DenseNet-BC by default.

    ``compression`` defaults to 0.5 with bottlenecks (BC) and 1.0 without (plain); the stem has ``2k``
    channels with bottlenecks and 16 without, as in the paper. ``weights``: a file, see
    :func:`effdense.weights.load_weights` (gpleiss/efficient_densenet_pytorch's default DenseNet-BC-100 k=12 is
    ``depth=100, growth_rate=12``).
    """
    if compression is None:
        compression = 0.5 if bottleneck else 1.0
    if num_init_features is None:
        num_init_features = 2 * growth_rate if bottleneck else 16
    model = EfficientDenseNet(growth_rate=growth_rate, block_config=cifar_block_config(depth, bottleneck),
                              num_init_features=num_init_features, compression=compression, drop_rate=drop_rate,
                              num_classes=num_classes, stem="cifar", bottleneck=bottleneck, **kwargs)
    return with_weights(model, weights, None)


def _cifar(depth: int, k: int, bottleneck: bool, doc: str) -> Callable[..., EfficientDenseNet]:
    def build(**kwargs) -> EfficientDenseNet:
        return densenet_cifar(depth=depth, growth_rate=k, bottleneck=bottleneck, **kwargs)
    build.__doc__ = doc
    build.config = (depth, k, bottleneck)  # what effdense.weights names a weight file's architecture by
    return build


#: every named model; the training command builds them by these names
MODELS: dict[str, Callable[..., EfficientDenseNet]] = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
    "densenet40": _cifar(40, 12, False, "plain DenseNet-40, k=12 (CIFAR)"),
    "densenet100_k12": _cifar(100, 12, False, "plain DenseNet-100, k=12 (CIFAR)"),
    "densenet100_k24": _cifar(100, 24, False, "plain DenseNet-100, k=24 (CIFAR)"),
    "densenet_bc_100_k12": _cifar(100, 12, True, "DenseNet-BC-100, k=12 (CIFAR)"),
    "densenet_bc_250_k24": _cifar(250, 24, True, "DenseNet-BC-250, k=24 (CIFAR)"),
    "densenet_bc_190_k40": _cifar(190, 40, True, "DenseNet-BC-190, k=40 (CIFAR)"),
}
