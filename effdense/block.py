"""``EfficientDenseBlock``: a drop-in for torchvision's ``_DenseBlock`` whose implementation is a backend.

The module tree and ``state_dict`` keys are torchvision's (``denselayer{i}.norm1``, ``.conv1``, ``.norm2``,
``.conv2``), so weights move both ways between this block and torchvision's; ``backend`` only chooses how the
forward and backward are computed (see :mod:`effdense.backends`).
"""
from __future__ import annotations

from typing import List, Union  # TorchScript reads these annotations (it does not read ``X | Y`` or Sequence)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .backends import naive


def exporting() -> bool:
    """Whether the forward is being captured into a graph for export: ``torch.jit.trace``, ``torch.onnx.export``
    (both exporters) or ``torch.export`` (``torch.jit.script`` is told apart by ``torch.jit.is_scripting()``)."""
    # cheapest first: is_in_onnx_export takes microseconds (two imports), and both ONNX exporters trace or export
    return _is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _is_exporting() -> bool:
    """``torch.compiler.is_exporting()``, read as its flag: dynamo in torch 2.11 folds the call itself to True under
    ``torch.compile`` too (torch/_dynamo/variables/torch.py), which would put compiled models on the reference path;
    the flag's value is what dynamo sees when it reads the attribute (False there, True under torch.export)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: BN-ReLU-Conv1x1(``bn_size*k``)-BN-ReLU-Conv3x3(``k``), then dropout.

    With ``bottleneck=False`` it is the paper's plain layer, BN-ReLU-Conv3x3(``k``), held as ``norm1``/``conv1``.
    Called on its own (a tensor or a list of tensors) it runs eagerly, as torchvision's layer does.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, bottleneck: bool = True) -> None:
        super().__init__()
        inner = bn_size * growth_rate if bottleneck else growth_rate
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, inner, kernel_size=1 if bottleneck else 3, stride=1,
                               padding=0 if bottleneck else 1, bias=False)
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(inner)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(inner, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        features = [input] if isinstance(input, Tensor) else list(input)
        if torch.jit.is_scripting():
            return self.reference(features)
        return self._eager(features)

    @torch.jit.unused
    def _eager(self, features: List[Tensor]) -> Tensor:
        return naive.layer_forward(self, features, use_checkpoint=self.memory_efficient and not exporting())

    def reference(self, features: List[Tensor]) -> Tensor:
        """The layer in TorchScript: torchvision's ``_DenseLayer``, i.e. the ``"naive"`` backend's
        :func:`~effdense.backends.naive.layer_forward` written with the layer's own modules (TorchScript cannot
        compile that function: it takes modules as arguments)."""
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        if hasattr(self, "norm2"):
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class EfficientDenseBlock(nn.ModuleDict):
    """A dense block: ``num_layers`` layers, each reading all earlier feature maps and adding
    ``growth_rate`` channels. Input ``[N, num_input_features, H, W]``, output
    ``[N, num_input_features + num_layers * growth_rate, H, W]``.

    Same constructor arguments as torchvision's ``_DenseBlock`` (``memory_efficient=True`` selects the
    ``"checkpoint"`` backend, as it does there), plus ``bottleneck`` and ``backend``: ``"naive"``,
    ``"checkpoint"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"auto"`` (see :mod:`effdense.backends`), and
    ``keep_bottleneck``: the ``"cpp"`` backend keeps each layer's bottleneck (``bn_size * growth_rate`` channels)
    from forward to backward instead of recomputing it there (faster, ``bn_size * growth_rate`` channels of
    memory per layer more: still linear in depth). :class:`~effdense.EfficientDenseNet` sets it per block
    (:func:`effdense.memory.bottleneck_plan`).
    """

    _version = 2
    __jit_unused_properties__ = ["num_output_features"]  # TorchScript: properties it need not compile

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int = 4, growth_rate: int = 32,
                 drop_rate: float = 0.0, memory_efficient: bool = False, bottleneck: bool = True,
                 backend: str = "auto", keep_bottleneck: bool = False) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_input_features", num_input_features),
                            ("growth_rate", growth_rate), ("bn_size", bn_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient,
                bottleneck))
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.bottleneck = bottleneck
        self.keep_bottleneck = bool(keep_bottleneck)
        self.backend = "checkpoint" if memory_efficient and backend == "auto" else backends.check_name(backend)

    @property
    def num_output_features(self) -> int:
        return self.num_input_features + len(self) * self.growth_rate

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" + (", keep_bottleneck=True" if self.keep_bottleneck else "")

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor of shape [N, {self.num_input_features}, H, W], "
                            f"got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input [N, {self.num_input_features}, H, W], "
                             f"got a {x.dim()}-D input of shape {tuple(x.shape)}")
        if not torch.jit.is_tracing() and x.shape[1] != self.num_input_features:  # traced: conv1 checks it
            raise ValueError(f"expected {self.num_input_features} input channels (input shape "
                             f"[N, {self.num_input_features}, H, W]), got {x.shape[1]} channels in shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input (float32, float64, float16 or bfloat16), "
                            f"got {x.dtype}")
        param = self.denselayer1.conv1.weight
        if x.device != param.device:
            raise ValueError(f"expected the input on {param.device}, where the block's parameters are, "
                             f"got it on {x.device}")
        if x.dtype != param.dtype and not (x.device.type in ("cpu", "cuda")
                                           and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"expected a {param.dtype} input (the block's parameter dtype), got {x.dtype}; "
                            "cast one of them, or run under torch.autocast")

    def which_backend(self, x: Tensor) -> str:
        """Name of the backend that runs for input ``x``."""
        return backends.resolve(self.backend, x.device, x.dtype).name

    def forward(self, x: Tensor) -> Tensor:
        # Export. The backends' kernels are operators of their own (``effdense::*``) that no exporter or runtime
        # outside effdense knows, so while a graph is captured for export (traced, scripted, torch.export, either ONNX
        # exporter) the block runs the "naive" backend's math instead: the same function of the same parameters
        # (the backends are tested equal to it), in standard operators, in train and eval mode alike. This was chosen
        # over decompositions registered for the effdense ops because TorchScript (jit.trace, jit.script, the
        # TorchScript-based ONNX exporter) has no decomposition table to use, and the memory the kernels save
        # matters in training, not in a deployed inference graph (where no activation is kept for a backward).
        if torch.jit.is_scripting():
            features = [x]
            for layer in self.values():
                features.append(layer(features))
            return torch.cat(features, 1)
        return self._eager(x)

    @torch.jit.unused
    def _eager(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if exporting():
            return naive.block_forward(x, list(self.values()))
        backend = backends.resolve(self.backend, x.device, x.dtype)
        return backend.forward(x, list(self.values()), **{k: getattr(self, k) for k in backend.options})
