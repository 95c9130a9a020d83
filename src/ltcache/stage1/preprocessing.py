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


TEST_CROPS = {0: None, 2: "flip", 5: "fivecrop", 10: "tencrop"}  # extract --test-crops K: the geometry of K views
CROP_EXPAND = 24  # LIFT's `expand`: five / ten crops are cut from the image resized to crop + 24 pixels


class Flipped(nn.Module):
    """`base`'s view of an image, mirrored left to right (the second of --test-crops 2)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, image):
        return torch.flip(self.base(image), dims=[-1])


class CropView(nn.Module):
    """View `k` of LIFT's test-time ensemble (trainer.py, tte_mode fivecrop / tencrop): the image resized to the crop
    size plus `expand` (its shorter side, or both sides when `squash`), torchvision's FiveCrop / TenCrop of the crop
    size, crop k of those (corners, then center; then their mirror images), scaled and normalized."""

    def __init__(self, preprocessing: Preprocessing, geometry: str, k: int, expand: int):
        super().__init__()
        from torchvision.transforms import InterpolationMode, v2

        self.k = k
        crop = list(preprocessing.crop)
        size = min(crop) + expand
        interpolation = InterpolationMode(preprocessing.interpolation)
        self.prepare = v2.Compose([v2.ToImage(), ToRGB(), v2.Resize((size, size) if preprocessing.squash else size,
                                                                    interpolation=interpolation, antialias=True)])
        self.crops = v2.FiveCrop(crop) if geometry == "fivecrop" else v2.TenCrop(crop)
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                  v2.Normalize(list(preprocessing.mean), list(preprocessing.std))])

    def forward(self, image):
        return self.finish(self.crops(self.prepare(image))[self.k])


def test_views(count: int, preprocessing: Preprocessing | None, base, expand: int = CROP_EXPAND) -> tuple[list, dict]:
    """The `count` transforms of extract --test-crops and the geometry the manifest records. 2: `base` (the test
    view) and its mirror image, for any backbone; 5 and 10: LIFT's five / ten crops, which need the backbone's own
    preprocessing (a library model, or torchvision's pretrained weights) to know the crop size."""
    from ltcache.core.errors import LtcacheError

    geometry = TEST_CROPS.get(count, "?")
    if geometry == "?":
        raise LtcacheError(f"--test-crops {count} is not a crop geometry; use 2 (the view and its mirror), 5 (five "
                           "crops) or 10 (ten crops)")
    if geometry == "flip":
        return [base, Flipped(base)], {"count": 2, "geometry": "flip", "views": "the test view, then its mirror"}
    if preprocessing is None:
        raise LtcacheError(f"--test-crops {count} cuts crops at the backbone's own input size, which this checkpoint "
                           "does not declare; use --test-crops 2 (the test view and its mirror)")
    views = [CropView(preprocessing, geometry, k, expand) for k in range(count)]
    return views, {"count": count, "geometry": geometry, "resize": min(preprocessing.crop) + expand,
                   "crop": list(preprocessing.crop), "expand": expand,
                   "views": "top-left, top-right, bottom-left, bottom-right, center"
                            + (", then the same of the mirrored image" if count == 10 else "")}
