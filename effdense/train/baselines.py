"""Classic CNNs adapted to 32x32 inputs, to compare DenseNets against on the same training command.

The adaptations are the usual CIFAR ones: stride-1 first convolutions and 2x2 pooling in place of the
ImageNet stems, classifiers sized for the smaller final feature map. AlexNet and ZF-Net keep their plain
convolutions and dropout classifiers; VGG, GoogLeNet and ResNet-50 use batch normalization (VGG without it
does not train at the paper recipe's learning rate of 0.1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def conv_stack(cin: int, cfg: Sequence, bn: bool) -> tuple[nn.Sequential, int]:
    """Convolutions from ``cfg`` entries ``(channels, kernel[, padding])`` (stride 1, ReLU; padding defaults to
    ``kernel // 2``), ``"M"`` a 2x2 max-pool; returns the stack and its output channels."""
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        cout, k, pad = (*item, item[1] // 2)[:3]
        if bn:
            layers.append(conv_bn(cin, cout, k))
        else:
            layers += [nn.Conv2d(cin, cout, k, padding=pad), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers), cin


class ConvNet(nn.Module):
    """A convolution stack, then a classifier of fully connected layers (``hidden`` widths, dropout between)."""

    def __init__(self, cfg: Sequence, num_classes: int, in_channels: int, bn: bool, hidden: Sequence[int] = (),
                 spatial: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.features, cout = conv_stack(in_channels, cfg, bn)
        widths = [cout * spatial * spatial, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Dropout(dropout), nn.Linear(a, b), nn.ReLU(inplace=True)] if dropout else \
                [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.classifier = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """LeNet-5 (LeCun et al., 1998): two 5x5 convolutions, fully connected 120-84 (ReLU, max-pool)."""
    return ConvNet([(6, 5, 0), "M", (16, 5, 0), "M"], num_classes, in_channels, bn=False, hidden=(120, 84),
                   spatial=5)


def alexnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """AlexNet (Krizhevsky et al., 2012) for 32x32: five convolutions, fully connected 4096-4096.

    Convolutions 5x5-5x5-3x3-3x3-3x3 (64-192-384-256-256 channels) with three 2x2 pools; dropout 0.5."""
    cfg = [(64, 5), "M", (192, 5), "M", (384, 3), (256, 3), (256, 3), "M"]
    return ConvNet(cfg, num_classes, in_channels, bn=False, hidden=(4096, 4096), spatial=4, dropout=0.5)


def zfnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ZF-Net (Zeiler & Fergus, 2014) for 32x32: AlexNet with a smaller first filter.

    Convolutions 3x3-5x5-3x3-3x3-3x3 with 96-256-384-384-256 channels, as ZF-Net widened AlexNet."""
    cfg = [(96, 3), "M", (256, 5), "M", (384, 3), (384, 3), (256, 3), "M"]
    return ConvNet(cfg, num_classes, in_channels, bn=False, hidden=(4096, 4096), spatial=4, dropout=0.5)


def _vgg(blocks: Sequence[int]) -> Callable[..., nn.Module]:
    cfg: list = []
    for n, width in zip(blocks, (64, 128, 256, 512, 512)):
        cfg += [(width, 3)] * n + ["M"]

    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return ConvNet(cfg, num_classes, in_channels, bn=True)
    return build


vgg16 = _vgg((2, 2, 3, 3, 3))
vgg16.__doc__ = "VGG-16 (Simonyan & Zisserman, 2015) with batch norm; five 2x2 pools take 32x32 to 1x1."
vgg19 = _vgg((2, 2, 4, 4, 4))
vgg19.__doc__ = "VGG-19 with batch norm, for 32x32 inputs."


class Inception(nn.Module):
    """GoogLeNet's inception module: 1x1, 1x1-3x3, 1x1-5x5 and 3x3-max-pool-1x1 branches, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([
            conv_bn(cin, c1, 1),
            nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3)),
            nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5)),
            nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1)),
        ])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


#: GoogLeNet's inception widths (Szegedy et al., 2015, table 1); "M" is a 3x3/2 max-pool
_GOOGLENET = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), "M",
              (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64),
              (512, 112, 144, 288, 32, 64, 64), (528, 256, 160, 320, 32, 128, 128), "M",
              (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128)]


def googlenet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """GoogLeNet (Szegedy et al., 2015), Inception v1 with batch norm, for 32x32.

    A 3x3 stem of 192 channels replaces the ImageNet stem; no auxiliary classifiers."""
    layers: list[nn.Module] = [conv_bn(in_channels, 192, 3)]
    layers += [nn.MaxPool2d(3, 2, 1) if w == "M" else Inception(*w) for w in _GOOGLENET]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4), nn.Linear(1024, num_classes)]
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet's 1x1-3x3-1x1 bottleneck (expansion 4), stride on the 3x3 convolution."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, 4 * width, 1, relu=False))
        self.shortcut = (nn.Identity() if stride == 1 and cin == 4 * width
                         else conv_bn(cin, 4 * width, 1, stride, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-50 (He et al., 2016), stages of 3-4-6-3 bottlenecks; a 3x3 stride-1 stem without max-pool."""
    layers: list[nn.Module] = [conv_bn(in_channels, 64, 3)]
    cin = 64
    for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(n):
            layers.append(Bottleneck(cin, width, 2 if i > 0 and j == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


#: every baseline by the name ``--arch`` takes; each builds ``fn(num_classes=..., in_channels=...)``
BASELINES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5, "alexnet": alexnet, "zfnet": zfnet, "vgg16": vgg16, "vgg19": vgg19,
    "googlenet": googlenet, "resnet50": resnet50,
}
