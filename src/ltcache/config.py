"""Frozen, typed configs for the commands; the resolved form is written as JSON next to every artifact."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ltcache.data import DatasetSpec
from ltcache.errors import LtcacheError, unknown_name

# Backbones sized for each dataset's images; anything else defaults to ResNet-50.
DEFAULT_BACKBONE = {"digits-lt": "smallresnet8", "fashion-mnist-lt": "smallresnet14", "cifar10-lt": "resnet32",
                    "cifar100-lt": "resnet32", "imagenet-lt": "resnext50_32x4d", "places-lt": "resnet152"}
PAPER_LR, PAPER_BATCH = 0.2, 512  # Sec. 5.1: lr 0.2 at batch 512, scaled linearly with the batch size


def scaled_lr(batch_size: int) -> float:
    return PAPER_LR * batch_size / PAPER_BATCH


@dataclass(frozen=True)
class TrainConfig:
    """Stage 1: backbone + linear classifier trained jointly with CE and a sampling strategy (Sec. 3)."""

    out: str
    dataset: str = "digits-lt"
    root: str | None = None
    imbalance_factor: float | None = None
    n_max: int | None = None
    seed: int = 0
    val_per_class: int | None = None
    image_size: int | None = None
    split_dir: str | None = None
    profile: str | None = None
    download: bool = False
    backbone: str | None = None
    pretrained: bool = False
    trainable: str | None = None
    compile: bool = False
    sampler: str = "instance"
    samples_per_class: int = 4  # class-aware sampler: consecutive images per visited class (official default)
    loss: str = "ce"
    loss_params: dict | None = None
    epochs: int = 30
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 5e-4
    momentum: float = 0.9
    workers: int = 0
    device: str | None = None
    overwrite: bool = False
    lr_rule: str | None = None  # how lr was set, stated in the resolved config

    def resolved(self) -> TrainConfig:
        return replace(
            self,
            backbone=self.backbone or DEFAULT_BACKBONE.get(self.dataset, "resnet50"),
            lr=self.lr if self.lr is not None else scaled_lr(self.batch_size),
            lr_rule="given" if self.lr is not None else f"{PAPER_LR} x batch_size / {PAPER_BATCH}",
        )

    def validate(self) -> None:
        """Check every name and number before any work starts or any folder is created."""
        from ltcache.data.datasets import DATASETS
        from ltcache.data.samplers import parse_sampler
        from ltcache.losses import build_loss
        from ltcache.models import check_backbone

        if self.dataset not in DATASETS:
            raise unknown_name("dataset", self.dataset, DATASETS)
        check_backbone(self.backbone, pretrained=self.pretrained)
        parse_sampler(self.sampler)
        build_loss(self.loss, [2, 1], self.loss_params)  # a bad loss name or parameter fails before any work
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise LtcacheError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise LtcacheError(f"--lr must be > 0, got {self.lr}")

    def dataset_spec(self) -> DatasetSpec:
        # The dataset options are flat here (the CLI and recipe surface); DatasetSpec names which ones they are.
        shared = {f.name for f in fields(DatasetSpec)} - {"name"}
        return DatasetSpec(name=self.dataset, **{name: getattr(self, name) for name in shared})

    def to_dict(self) -> dict:
        return asdict(self)


def load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomllib backport
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"recipe {path} not found; see experiments/ for the shipped recipes")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise LtcacheError(f"recipe {path} is not valid TOML ({exc})") from None


def train_config_from(values: dict, *, explicit: set[str] = frozenset(), recipe: Path | None = None) -> TrainConfig:
    """Defaults < the TOML recipe < flags given on the command line. Unknown recipe keys are an error."""
    known = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in values.items() if k in known}
    if "loss_param" in values:  # the repeatable --loss-param NAME=VALUE flag
        from ltcache.losses import parse_loss_params

        merged["loss_params"] = parse_loss_params(values["loss_param"]) or None
        if "loss_param" in explicit:
            explicit = {*explicit, "loss_params"}
    if recipe is not None:
        table = load_toml(recipe)
        table = table.get("train", table)  # a recipe may hold its keys at top level or under [train]
        unknown = sorted(set(table) - known)
        if unknown:
            raise LtcacheError(f"recipe {recipe} has unknown key {unknown[0]!r}; known keys: "
                               f"{', '.join(sorted(known))}")
        merged.update({k: v for k, v in table.items() if k not in explicit})
    if not merged.get("out"):
        raise LtcacheError("no run folder: pass --out (or set out = ... in the recipe)")
    merged["out"] = str(merged["out"])
    return TrainConfig(**merged)
