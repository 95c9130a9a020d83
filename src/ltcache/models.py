"""Backbones by name: `build_model(arch, num_classes, in_channels)` -> feature extractor + linear head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from ltcache.errors import unknown_name


class Classifier(nn.Module):
    """A backbone producing `feature_dim` penultimate features, then the jointly trained linear head `fc`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


class SmallResNet(nn.Module):
    """A CIFAR-style residual net for small inputs (8x8 digits, 28x28 Fashion-MNIST).

    A 3x3 stride-1 stem, three stages of BasicBlocks (strides 1, 2, 2), global average pooling.
    """

    def __init__(self, widths: tuple[int, int, int], blocks_per_stage: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                downsample = None
                if stride != 1 or channels != width:
                    downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                stages.append(BasicBlock(channels, width, stride, downsample))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def _torchvision_resnet(factory: Callable[[], ResNet]) -> Callable[[int], tuple[nn.Module, int]]:
    def build(in_channels: int) -> tuple[nn.Module, int]:
        net = factory()
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 7, 2, 3, bias=False)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, feature_dim

    return build


def _small(widths, blocks):
    def build(in_channels: int) -> tuple[nn.Module, int]:
        net = SmallResNet(widths, blocks, in_channels)
        return net, net.feature_dim

    return build


BACKBONES: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    # 1 stem conv + 3 stages x 1 block x 2 convs + fc = 8 layers; 64-d features. Digits-sized.
    "smallresnet8": _small((16, 32, 64), 1),
    # 1 + 3 x 2 x 2 + 1 = 14 layers; 128-d features. Fashion-MNIST-sized.
    "smallresnet14": _small((32, 64, 128), 2),
    # ResNet-10 of the paper / OLTR: torchvision's ResNet with one BasicBlock per stage.
    "resnet10": _torchvision_resnet(lambda: ResNet(BasicBlock, [1, 1, 1, 1])),
}
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
              "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"):
    BACKBONES[_name] = _torchvision_resnet(lambda _n=_name: torchvision.models.get_model(_n, weights=None))


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> Classifier:
    """Build a registered backbone with a fresh linear head of `num_classes` outputs."""
    if arch not in BACKBONES:
        raise unknown_name("backbone", arch, BACKBONES)
    backbone, feature_dim = BACKBONES[arch](in_channels)
    return Classifier(backbone, feature_dim, num_classes)
