"""Eval-time image preprocessing, as the libraries and torchvision's weights declare it: resize, center crop,
scale, normalize, grayscale replicated to RGB. Shared by models.py (torchvision weights) and hub.py (timm,
open_clip)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """Eval-time preprocessing from a library's config: resize (the shorter side to `resize`, or both sides to
    `resize` x `resize` when `squash`), center crop to `crop`, scale to [0, 1], normalize by mean and std."""

    crop: tuple[int, int]
    resize: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    squash: bool = False

    def transform(self):
        """One torchvision v2 transform: PIL image or uint8 [C, H, W] tensor in, normalized float [3, H, W] out."""
        from torchvision.transforms import InterpolationMode, v2

        interpolation = InterpolationMode(self.interpolation)
        size = (self.resize, self.resize) if self.squash else self.resize
        return v2.Compose([v2.ToImage(), ToRGB(), v2.Resize(size, interpolation=interpolation, antialias=True),
                           v2.CenterCrop(list(self.crop)), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(self.mean), list(self.std))])

    def describe(self) -> dict:
        about = asdict(self)
        about["crop"], about["mean"], about["std"] = list(self.crop), list(self.mean), list(self.std)
        about["grayscale"] = "replicated to 3 channels"
        return about


class ToRGB(nn.Module):
    """A 1-channel image becomes 3 equal channels (grayscale data on RGB models); 3 channels pass unchanged."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(3, *image.shape[-2:]) if image.shape[-3] == 1 else image
