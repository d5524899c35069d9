"""effdense: DenseNets whose training memory grows linearly in depth.

>>> import effdense
>>> model = effdense.densenet_cifar(depth=100, growth_rate=12, num_classes=10)   # DenseNet-BC-100, k=12
>>> model = effdense.densenet121(weights="densenet121-a639ec97.pth")  # doctest: +SKIP
"""
from .backends import AUTO_ORDER, BACKENDS
from .block import DenseLayer, EfficientDenseBlock
from .models import (MODELS, EfficientDenseNet, Transition, cifar_block_config, densenet121, densenet161,
                     densenet169, densenet201, densenet264, densenet_cifar)
from .weights import load_weights

__version__ = "0.1.0"


def release_workspace() -> None:
    """Free the scratch memory the ``cpp`` backend keeps across layers, blocks and steps (one CPU workspace, see
    :mod:`effdense.backends.cpp_backend`); the next step allocates it again. Nothing to do without the extension."""
    from .backends import cpp_backend
    cpp_backend.release_workspace()


__all__ = [
    "AUTO_ORDER", "BACKENDS", "DenseLayer", "EfficientDenseBlock", "EfficientDenseNet", "MODELS", "Transition",
    "cifar_block_config", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_cifar", "load_weights", "release_workspace", "__version__",
]
