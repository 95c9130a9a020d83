"""Backbones by name: `build_model(arch, num_classes, in_channels)` -> feature extractor + linear head.

Any torchvision classification model works: its last nn.Linear (ResNet `fc`, VGG / EfficientNet / ConvNeXt
`classifier`, ViT `heads`, ...) is replaced by an identity, so the backbone yields that layer's input features.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ltcache.core.errors import LtcacheError, unknown_name
from ltcache.core.registry import Registry


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
    """A residual net for small inputs (8x8 digits, 28x28 Fashion-MNIST): 3x3 stride-1 stem, three stages of
    BasicBlocks (strides 1, 2, 2) with 1x1 projection shortcuts, global average pooling."""

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


class _PadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016) for CIFAR: subsample by 2 and zero-pad the new channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarResNet(nn.Module):
    """ResNet-32 of the LDAM-DRW code (Cao et al. 2019): 16/32/64 channels, 5 BasicBlocks per stage, option-A
    shortcuts, Kaiming-normal init; 64-d features."""

    def __init__(self, blocks_per_stage: int = 5, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        blocks, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = _PadShortcut(width - channels) if stride != 1 or channels != width else None
                blocks.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)


def strip_head(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Replace the model's last nn.Linear (its classifier) by an identity; return the net and that layer."""
    linears = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise LtcacheError(f"{type(net).__name__} has no linear classifier to take features from; choose another "
                           "backbone")
    name, head = linears[-1]
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return net, head


def adapt_input_channels(net: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel convolution for one taking `in_channels` (grayscale data on RGB models)."""
    if in_channels == 3:
        return
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            replacement = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                                    module.padding, module.dilation, module.groups, module.bias is not None)
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], replacement)
            return


# Backbones that torchvision does not register, by name: factory(in_channels) -> nn.Module. A small net (with a
# `feature_dim` and no classifier) is used as is; a torchvision-style net has its classifier stripped.
BACKBONES: Registry[Callable[[int], nn.Module]] = Registry("backbone")


def backbone(name: str):
    """Register factory(in_channels) -> nn.Module as backbone `name` (beside every torchvision model name)."""
    return BACKBONES.register(name)


@backbone("smallresnet8")
def smallresnet8(in_channels: int) -> nn.Module:
    """1 + 3x1x2 + 1 layers; 64-d; digits-sized."""
    return SmallResNet((16, 32, 64), 1, in_channels)


@backbone("smallresnet14")
def smallresnet14(in_channels: int) -> nn.Module:
    """1 + 3x2x2 + 1 layers; 128-d; 28x28-sized."""
    return SmallResNet((32, 64, 128), 2, in_channels)


@backbone("resnet32")
def resnet32(in_channels: int) -> nn.Module:
    """1 + 3x5x2 + 1 layers; 64-d; CIFAR."""
    return CifarResNet(5, in_channels)


@backbone("resnet10")
def resnet10(in_channels: int) -> nn.Module:
    """ResNet-10 of OLTR and the paper (Table 2)."""
    return ResNet(BasicBlock, [1, 1, 1, 1])


@backbone("resnext101_32x4d")
def resnext101_32x4d(in_channels: int) -> nn.Module:
    """ResNeXt-101 32x4d of the official code (not in torchvision)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)


@backbone("resnext152_32x4d")
def resnext152_32x4d(in_channels: int) -> nn.Module:
    """ResNeXt-152 32x4d of the paper's Places-LT and iNaturalist rows (not in torchvision)."""
    return ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=4)


@lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def backbone_names() -> list[str]:
    return sorted({*BACKBONES, *torchvision_classifiers()})


def check_backbone(arch: str, *, pretrained: bool = False) -> None:
    """A known backbone name (else the closest names), with torchvision weights when `pretrained`."""
    if ":" in arch:
        raise LtcacheError(f"{arch!r} is a model library's backbone, which ltcache extracts frozen (ltcache extract "
                           "--backbone NAME); train-backbone takes a torchvision model or ltcache backbone name")
    if arch not in BACKBONES and arch not in torchvision_classifiers():
        raise unknown_name("backbone", arch, backbone_names(), instead="ltcache list backbones shows them all")
    if pretrained and arch not in torchvision_classifiers():
        raise LtcacheError(f"torchvision has no pretrained weights for {arch!r}; drop --pretrained")


def build_model(arch: str, num_classes: int, in_channels: int = 3, *, pretrained: bool = False) -> Classifier:
    """Build a backbone by name with a fresh linear head of `num_classes` outputs.

    pretrained loads torchvision's default ImageNet weights into the backbone (downloaded by torchvision).
    """
    return build_with_own_head(arch, num_classes, in_channels, pretrained=pretrained)[0]


def build_with_own_head(arch: str, num_classes: int, in_channels: int = 3, *,
                        pretrained: bool = False) -> tuple[Classifier, nn.Linear | None]:
    """build_model, and the model's own classifier that was replaced by the fresh head (None for a small net)."""
    check_backbone(arch, pretrained=pretrained)
    if arch in BACKBONES:
        net = BACKBONES[arch](in_channels)
        if hasattr(net, "feature_dim"):  # a small net: features out, no classifier to strip
            return Classifier(net, net.feature_dim, num_classes), None
    else:
        options = {"aux_logits": False} if arch in ("googlenet", "inception_v3") and not pretrained else {}
        net = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, **options)
        if arch == "inception_v3":  # its pretrained weights come with the auxiliary head; train without it
            net.aux_logits, net.AuxLogits = False, None
    adapt_input_channels(net, in_channels)
    net, own = strip_head(net)
    return Classifier(net, own.in_features, num_classes), own


def pretrained_preprocessing(arch: str):
    """The eval preprocessing of torchvision's default weights for `arch` (hub.Preprocessing): their own resize,
    crop, interpolation, mean and std, read from the weights' metadata (nothing is downloaded)."""
    from ltcache.stage1.preprocessing import Preprocessing

    transform = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    crop, resize = list(transform.crop_size), list(transform.resize_size)
    return Preprocessing((crop[0], crop[-1]), resize[0], transform.interpolation.value, tuple(transform.mean),
                         tuple(transform.std), squash=len(resize) == 2)


def pretrained_categories(arch: str) -> list[str] | None:
    """The class names torchvision's default weights for `arch` were trained on (their metadata)."""
    return list(torchvision.models.get_model_weights(arch).DEFAULT.meta.get("categories") or []) or None


def select_trainable(model: Classifier, groups: str | None) -> list[nn.Parameter]:
    """Freeze all but the named parameter groups (`layer4,fc`: prefixes of backbone parameters, `fc` the head)."""
    if not groups:
        return list(model.parameters())
    prefixes = [g.strip() for g in groups.split(",") if g.strip()]
    names = {name: name.removeprefix("backbone.") for name, _ in model.named_parameters()}

    def in_group(short: str, prefix: str) -> bool:
        return short == prefix or short.startswith(prefix + ".")

    unmatched = [p for p in prefixes if not any(in_group(short, p) for short in names.values())]
    if unmatched or not prefixes:
        top = sorted({short.split(".")[0] for short in names.values()})
        raise LtcacheError(f"--trainable {(unmatched or [groups])[0]!r} names no parameter; groups are: "
                           f"{', '.join(top)}")
    chosen = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(in_group(names[name], p) for p in prefixes))
        if parameter.requires_grad:
            chosen.append(parameter)
    return chosen
