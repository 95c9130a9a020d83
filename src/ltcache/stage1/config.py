"""Every command's options, declared once (params.py): type, range or choices, help. The command line is generated
from these declarations, recipes are checked against them, and the library functions check their keyword arguments
with them. Importing this module does not import torch (`--help` stays fast)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ltcache.core.errors import LtcacheError
from ltcache.core.options import (  # noqa: F401  (the stage-2 and shared declarations, re-exported)
    AS_JSON,
    COMPARE,
    DEVICE,
    DTYPE,
    INFO,
    MAX_SEED,
    SHARD_ROWS,
    SWEEP_TAU,
    check_thresholds,
    load_toml,
)
from ltcache.core.params import Param, declared, params_of
from ltcache.core.runtime import PAPER_BATCH, PAPER_LR, scaled_lr
from ltcache.data.spec import DatasetSpec, dataset_registry  # noqa: F401  (DatasetSpec: re-exported)

# extract --features: what a library backbone gives (stage1/hub.py builds each), the one list of the kinds and what
# each is: the library's own feature (auto), a ViT's tokens as DINOv2's linear protocol builds them
# (dinov2/eval/linear.py, create_linear_input), or a CLIP image tower's output before / after its projection.
FEATURE_KINDS = {
    "auto": "the library's own: timm's pre-logits feature, CLIP's projected embedding",
    "cls": "timm ViT: the class token after the final norm",
    "cls_patch": "timm ViT: the class token and the mean of the patch tokens (DINOv2's linear protocol, 1 block)",
    "cls4_patch": "timm ViT: the class tokens of the last 4 blocks and the mean patch token of the last (DINOv2's "
                  "linear protocol, n_last_blocks 4)",
    "projected": "CLIP: the image embedding after the projection (the text head's space; auto)",
    "pre_projection": "CLIP ViT: the image tower's output before the projection (LIFT's and CLIP's linear probes)",
    "both": "CLIP ViT: the pre-projection features stored with the projection, so the zero-shot head still applies",
}

# Backbones sized for each dataset's images; anything else defaults to ResNet-50.
DEFAULT_BACKBONE = {"digits-lt": "smallresnet8", "fashion-mnist-lt": "smallresnet14", "cifar10-lt": "resnet32",
                    "cifar100-lt": "resnet32", "imagenet-lt": "resnext50_32x4d", "places-lt": "resnet152"}


def _samplers():
    from ltcache.core.sampling import SAMPLERS

    return SAMPLERS


def _losses():
    from ltcache.stage1.losses import LOSSES

    return LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """Stage 1: backbone + linear classifier trained jointly with CE and a sampling strategy (Sec. 3).

    `data` is the dataset's spec, nested; every other declared field is a train-backbone option and a recipe key.
    On the command line and in recipes the options are flat (--dataset, --root, ..., --epochs): `options()` lists
    them and `from_options` builds a config from them."""

    out: str | None = declared(None, "Run folder for config.json, metrics.jsonl and checkpoint.pt.")
    data: DatasetSpec = field(default_factory=DatasetSpec)
    seed: int = declared(0, "Seeds the split, the sampler and the initialization.", low=0, high=MAX_SEED)
    backbone: str | None = declared(None, "smallresnet8/14, resnet10/32, any torchvision model name.")
    pretrained: bool = declared(False, "Start from torchvision's ImageNet weights (downloads them).")
    init: str | None = declared(None, "Start from these weights and fine-tune (Table 1): an ltcache checkpoint.pt or a "
                                "classifier-balancing final_model_checkpoint.pth; optimizer and schedule start fresh.")
    trainable: str | None = declared(None, "Train only these parameter groups, e.g. layer4,fc.")
    compile: bool = declared(False, "torch.compile the model (CUDA).")
    sampler: str = declared("instance", "Sampling strategy (Eq. 1-2) or the official class-aware sampler.",
                            choices=_samplers)
    samples_per_class: int = declared(4, "class-aware sampler: consecutive images per visited class.", low=1,
                                     high=10**6)
    loss: str = declared("ce", "Training loss.", choices=_losses)
    loss_params: dict | None = declared(None, "Loss parameters (on the command line: --loss-param NAME=VALUE).")
    epochs: int = declared(30, "Training epochs.", low=1, high=100_000)
    batch_size: int = declared(128, "Global batch size (split across torchrun processes).", low=1,
                                  high=2**24)
    lr: float | None = declared(None, "Peak learning rate (default 0.2 x batch / 512).", above=0)
    weight_decay: float = declared(5e-4, "SGD weight decay.", low=0)
    momentum: float = declared(0.9, "SGD momentum.", low=0, below=1)
    workers: int = declared(0, "Data-loading worker processes.", low=0, high=1024)
    device: str | None = declared(None, "cpu, cuda or cuda:N (default: CUDA when present).")
    overwrite: bool = declared(False, "Replace an existing run folder, once the new run has its first checkpoint.")
    tensorboard: bool = declared(False, "Write TensorBoard events (loss, lr, images/s, val accuracy) into "
                                 "RUN/tensorboard; needs pip install 'ltcache[tensorboard]'.")
    lr_rule: str | None = None  # how lr was set, stated in the resolved config (not a recipe key)

    def __post_init__(self):
        if self.data.seed != self.seed:  # one seed: the split's is the run's
            object.__setattr__(self, "data", replace(self.data, seed=self.seed))

    @property
    def dataset(self) -> str:
        """The dataset's registered name."""
        return self.data.name

    @staticmethod
    def options() -> dict[str, Param]:
        """The flat options (command line and recipe keys): out, the dataset spec's (name as `dataset`), the rest."""
        params = dict(params_of(TrainConfig))  # a copy: params_of is cached
        spec = {("dataset" if name == "name" else name): replace(param, name="dataset") if name == "name" else param
                for name, param in params_of(DatasetSpec).items()}
        return {"out": params.pop("out"), **spec, **params}

    @classmethod
    def from_options(cls, **values) -> TrainConfig:
        """A config from flat options (dataset=..., root=..., epochs=...); the dataset's go into `data`."""
        spec_keys = {("dataset" if f.name == "name" else f.name) for f in fields(DatasetSpec)} - {"seed"}
        spec = {("name" if key == "dataset" else key): values.pop(key) for key in list(values) if key in spec_keys}
        return cls(data=DatasetSpec(**spec), **values)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """A config as config.json or a checkpoint stores it: nested (`data`), or flat as ltcache 0.1 wrote it."""
        known = {f.name for f in fields(cls)} | set(cls.options())
        values = {k: v for k, v in saved.items() if k in known}
        if isinstance(values.get("data"), dict):
            return cls(**{**values, "data": DatasetSpec.from_dict(values["data"])})
        return cls.from_options(**values)

    def resolved(self) -> TrainConfig:
        return replace(
            self,
            backbone=self.backbone or DEFAULT_BACKBONE.get(self.dataset, "resnet50"),
            lr=self.lr if self.lr is not None else scaled_lr(self.batch_size),
            lr_rule="given" if self.lr is not None else f"{PAPER_LR} x batch_size / {PAPER_BATCH}",
        )

    def validate(self) -> None:
        """Check every declared value, then every name against its registry, before any work or folder."""
        from ltcache.stage1.losses import build_loss
        from ltcache.stage1.models import check_backbone

        for name, param in params_of(TrainConfig).items():
            param.check(getattr(self, name))
        for name, param in params_of(DatasetSpec).items():
            param.check(getattr(self.data, name), "--dataset" if name == "name" else None)
        if not self.out:
            raise LtcacheError("no run folder: pass --out (or set out = ... in the recipe)")
        if self.backbone is not None:
            check_backbone(self.backbone, pretrained=self.pretrained)
        if self.init is not None and self.pretrained:
            raise LtcacheError("--init and --pretrained both give starting weights; pass one of them")
        if self.loss_params is not None:
            check_loss_params(self.loss, self.loss_params, where="loss_params")
        build_loss(self.loss, [2, 1], self.loss_params)  # a bad loss parameter fails before any work

    def to_dict(self) -> dict:
        return asdict(self)


TRAIN_EXTRA = (
    Param("config", Path, None, "TOML recipe (experiments/*.toml); flags given on the command line win.",
          optional=True),
    Param("loss_param", list, [], "Loss parameter NAME=VALUE, e.g. gamma=2, beta=0.9999, drw_epoch=160, tau=1 "
          "(repeatable).", option="--loss-param"),
    Param("resume", Path, None, "Continue this killed run from its last checkpoint (its own config; only --device "
          "and --workers may change).", optional=True),
)

EXTRACT = (
    Param("out", Path, None, "Cache folder to create."),
    Param("dataset", str, None, "Without a checkpoint, or with a classifier-balancing one (which records neither): "
          "the dataset whose splits to extract.", optional=True, choices=dataset_registry),
    Param("backbone", str, None, "Without a checkpoint: any torchvision model or ltcache backbone, timm:<name> "
          "(pip install 'ltcache[timm]') or open_clip:<arch>/<tag> (pip install 'ltcache[open_clip]'); with a "
          "classifier-balancing checkpoint: resnet10, resnext50_32x4d or resnext152_32x4d.", optional=True),
    Param("pretrained", bool, False, "Without a checkpoint: the library's pretrained weights for --backbone "
          "(torchvision's default ones, timm's default or named tag, open_clip's tag; the library downloads them on "
          "first use) and their own preprocessing.", option="--pretrained"),
    Param("joint_head", str, "auto", "Without a checkpoint, the cache's joint head: the model's own classifier "
          "(own; auto when the weights' classes are the dataset's) or an instance-balanced linear probe on train "
          "(probe; auto otherwise).", choices=("auto", "own", "probe")),
    Param("zero_shot", bool, False, "With open_clip:<arch>/<tag>: also store CLIP's zero-shot text head, built from "
          "the class names and --templates (compare it as zero_shot, zs_ensemble, gla).", option="--zero-shot"),
    Param("class_names", Path, None, "With --zero-shot: a text file of the names the text tower reads, one per "
          "class in label order (default: the dataset's class names; CLIP's names for ImageNet wnids).",
          optional=True),
    Param("templates", str, "openai", "With --zero-shot: the prompts, openai (CLIP's 80 ImageNet prompts), simple "
          "(its 7) or a text file with one prompt per line, {} for the class name."),
    Param("features", str, "auto", "Without a checkpoint, what the backbone gives: auto (timm's pre-logits feature, "
          "CLIP's projected embedding); for a timm ViT cls, cls_patch (DINOv2's linear protocol: class token + mean "
          "patch token) or cls4_patch (class tokens of the last 4 blocks + mean patch token); for CLIP projected, "
          "pre_projection (the tower before its projection, LIFT's features) or both (pre-projection features plus "
          "the projection, so --zero-shot still applies).",
          choices=tuple(FEATURE_KINDS)),
    Param("root", str, None, "Dataset folder, if it moved since training (always, for a classifier-balancing "
          "checkpoint).", optional=True),
    Param("split_dir", str, None, "Split-file folder, if it moved since training.", optional=True),
    Param("image_column", str, None, "--dataset hf: the column of the images (default image).", optional=True),
    Param("label_column", str, None, "--dataset hf: the column of the class labels (default label).",
          optional=True),
    Param("val_per_class", int, None, "Without a checkpoint: balanced val images per class carved from train when "
          "the dataset has no val split (dataset default; hf: 20).", optional=True, low=0, high=10**8),
    DTYPE,
    Param("batch_size", int, 512, "Images per forward pass.", low=1, high=2**24),
    Param("workers", int, 0, "Data-loading worker processes.", low=0, high=1024),
    SHARD_ROWS,
    DEVICE,
    Param("overwrite", bool, False, "Replace an existing cache (only once the new one is complete)."),
    Param("train_views", int, 0, "Also store K augmented views of every train image; cRT, LWS, DisAlign and the "
          "other trained heads then sample among them.", low=0, high=1000),
    Param("test_crops", int, 0, "Also store K views of every val and test image for test-time ensembling (compare "
          "--tta): 2 (the test view and its mirror), 5 or 10 (LIFT's five / ten crops of the image resized to the "
          "crop size + --crop-expand; a library backbone or pretrained weights).", low=0, high=10),
    Param("crop_expand", int, 24, "With --test-crops 5 or 10: pixels added to the crop size before cropping "
          "(LIFT's expand).", low=0, high=4096),
    Param("resume", bool, False, "Continue a killed extract of the same checkpoint and options into --out: the "
          "finished shards (sha256-checked) are kept, only the rest is extracted, under any number of processes."),
)

IMPORT_FEATURES = (
    Param("out", Path, None, "Cache folder to create."),
    Param("train", Path, None, "Train features: .npz/.pt with features [n, d] and labels [n], or .npy."),
    Param("test", Path, None, "Test features, same format."),
    Param("val", Path, None, "Val features (without them, select with --select train).", optional=True),
    Param("head", Path, None, ".npz/.pt with the model's classifier: weight [C, d], bias [C].", optional=True),
    Param("class_names", Path, None, "Text file, one class name per line.", optional=True),
    DTYPE,
    Param("seed", int, 0, "Seed of the linear probe fitted when there is no --head.", low=0, high=MAX_SEED),
    Param("overwrite", bool, False, "Replace an existing cache (only once the new one is complete)."),
)

INAT_SPLITS = (
    Param("out", Path, None, "Folder for iNaturalist18_train.txt and iNaturalist18_val.txt."),
    Param("overwrite", bool, False, "Replace existing split files."),
)

DEMO = (
    Param("out", Path, None, "Output folder (default: a fresh ./ltcache-demo[-N]).", optional=True),
    Param("epochs", int, 40, "Stage-1 epochs.", low=1, high=100_000),
    Param("seed", int, 0, "Seed.", low=0, high=MAX_SEED),
    DEVICE,
    Param("overwrite", bool, False, "Replace the run and cache inside --out if they exist (ltcache's only)."),
)


# ------------------------------------------------------------------------------------------------ recipes


def train_config_from(values: dict, *, explicit: set[str] = frozenset(), recipe: Path | None = None) -> TrainConfig:
    """Defaults < the TOML recipe < flags given on the command line. Recipe values must have their declared type
    (a string is not a bool, 1.5 is not an integer); unknown keys are an error."""
    declared_params = TrainConfig.options()
    merged = {k: v for k, v in values.items() if k in declared_params}
    if recipe is not None:
        table = load_toml(recipe)
        table = table["train"] if isinstance(table.get("train"), dict) else {
            key: value for key, value in table.items() if key != "compare"}  # a flat recipe; [compare] is compare's
        unknown = sorted(set(table) - set(declared_params))
        if unknown:
            raise LtcacheError(f"recipe {recipe} has unknown key {unknown[0]!r}; known keys: "
                               f"{', '.join(sorted(declared_params))}")
        for key, value in table.items():
            if key not in explicit:
                merged[key] = declared_params[key].check(value, f"recipe {recipe}: {key!r}")
        if "loss_params" in table and "loss_param" not in explicit:
            merged["loss_params"] = check_loss_params(merged.get("loss", "ce"), table["loss_params"],
                                                      where=f"recipe {recipe}: loss_params")
    if values.get("loss_param") and ("loss_param" in explicit or "loss_params" not in merged):
        merged["loss_params"] = parse_loss_params(merged.get("loss", "ce"), values["loss_param"])
    if not merged.get("out"):
        raise LtcacheError("no run folder: pass --out (or set out = ... in the recipe)")
    merged["out"] = str(merged["out"])
    return TrainConfig.from_options(**merged)


def parse_loss_params(loss: str | None, items) -> dict:
    """['gamma=2', 'drw_epoch=160'] -> {'gamma': 2.0, 'drw_epoch': 160}, typed by the loss's declarations."""
    from ltcache.stage1.losses import loss_params

    declared_params = loss_params(loss or "ce")
    params = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise LtcacheError(f"--loss-param {item!r} must look like NAME=VALUE, e.g. gamma=2")
        if key not in declared_params:
            raise LtcacheError(f"loss {loss or 'ce'} has no parameter {key!r}; it has "
                               f"{', '.join(declared_params) or 'none'}")
        params[key] = declared_params[key].parse(value, f"--loss-param {key}")
    return params


def check_loss_params(loss: str, table, *, where: str) -> dict:
    from ltcache.stage1.losses import loss_params

    if not isinstance(table, dict):
        raise LtcacheError(f"{where} must be a table of NAME = VALUE")
    declared_params = loss_params(loss)
    unknown = sorted(set(table) - set(declared_params))
    if unknown:
        raise LtcacheError(f"{where}: loss {loss} has no parameter {unknown[0]!r}; it has "
                           f"{', '.join(declared_params) or 'none'}")
    return {key: declared_params[key].check(value, f"{where}.{key}") for key, value in table.items()}
