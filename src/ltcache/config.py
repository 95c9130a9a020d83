"""Every command's options, declared once (params.py): type, range or choices, help. The command line is generated
from these declarations, recipes are checked against them, and the library functions check their keyword arguments
with them. Importing this module does not import torch (`--help` stays fast)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ltcache.errors import LtcacheError
from ltcache.params import GRID, Param, declared, params_of

# Backbones sized for each dataset's images; anything else defaults to ResNet-50.
DEFAULT_BACKBONE = {"digits-lt": "smallresnet8", "fashion-mnist-lt": "smallresnet14", "cifar10-lt": "resnet32",
                    "cifar100-lt": "resnet32", "imagenet-lt": "resnext50_32x4d", "places-lt": "resnet152"}
PAPER_LR, PAPER_BATCH = 0.2, 512  # Sec. 5.1: lr 0.2 at batch 512, scaled linearly with the batch size
MAX_SEED = 2**32 - 1


def scaled_lr(batch_size: int) -> float:
    return PAPER_LR * batch_size / PAPER_BATCH


def _datasets():
    from ltcache.data import DATASETS

    return DATASETS


def _samplers():
    from ltcache.data.samplers import SamplerName

    return [s.value for s in SamplerName]


def _losses():
    from ltcache.losses import LOSSES

    return LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """Stage 1: backbone + linear classifier trained jointly with CE and a sampling strategy (Sec. 3).

    Each declared field is a command-line option of train-backbone and a key of a TOML recipe."""

    out: str | None = declared(None, "Run folder for config.json, metrics.jsonl and checkpoint.pt.")
    dataset: str = declared("digits-lt", "Registered dataset name.", choices=_datasets)
    root: str | None = declared(None, "Dataset folder (fashion-mnist-lt: the idx files).")
    imbalance_factor: float | None = declared(None, "n_max / n_min of the long-tail profile (dataset default).",
                                              low=1)
    n_max: int | None = declared(None, "Train images of the most frequent class (dataset default).", low=1)
    seed: int = declared(0, "Seeds the split, the sampler and the initialization.", low=0, high=MAX_SEED)
    val_per_class: int | None = declared(None, "Balanced val images per class (dataset default).", low=0)
    image_size: int | None = declared(None, "Crop size for file datasets (default 224).", low=1, high=8192)
    split_dir: str | None = declared(None, "Folder with the split files (default: --root).")
    profile: str | None = declared(None, "imagefolder long tail.", choices=("exponential", "step", "none"))
    download: bool = declared(False, "cifar*-lt: let torchvision download the data (needs internet).")
    backbone: str | None = declared(None, "smallresnet8/14, resnet10/32, any torchvision model name.")
    pretrained: bool = declared(False, "Start from torchvision's ImageNet weights (downloads them).")
    trainable: str | None = declared(None, "Train only these parameter groups, e.g. layer4,fc.")
    compile: bool = declared(False, "torch.compile the model (CUDA).")
    sampler: str = declared("instance", "Sampling strategy (Eq. 1-2) or the official class-aware sampler.",
                            choices=_samplers)
    samples_per_class: int = declared(4, "class-aware sampler: consecutive images per visited class.", low=1)
    loss: str = declared("ce", "Training loss.", choices=_losses)
    loss_params: dict | None = declared(None, "Loss parameters (on the command line: --loss-param NAME=VALUE).")
    epochs: int = declared(30, "Training epochs.", low=1, high=100_000)
    batch_size: int = declared(128, "Global batch size (split across torchrun processes).", low=1)
    lr: float | None = declared(None, "Peak learning rate (default 0.2 x batch / 512).", above=0)
    weight_decay: float = declared(5e-4, "SGD weight decay.", low=0)
    momentum: float = declared(0.9, "SGD momentum.", low=0, below=1)
    workers: int = declared(0, "Data-loading worker processes.", low=0, high=1024)
    device: str | None = declared(None, "cpu, cuda or cuda:N (default: CUDA when present).")
    overwrite: bool = declared(False, "Replace an existing run folder, once the new run has its first checkpoint.")
    lr_rule: str | None = None  # how lr was set, stated in the resolved config (not a recipe key)

    def resolved(self) -> TrainConfig:
        return replace(
            self,
            backbone=self.backbone or DEFAULT_BACKBONE.get(self.dataset, "resnet50"),
            lr=self.lr if self.lr is not None else scaled_lr(self.batch_size),
            lr_rule="given" if self.lr is not None else f"{PAPER_LR} x batch_size / {PAPER_BATCH}",
        )

    def validate(self) -> None:
        """Check every declared value, then every name against its registry, before any work or folder."""
        from ltcache.losses import build_loss
        from ltcache.models import check_backbone

        for name, param in params_of(TrainConfig).items():
            param.check(getattr(self, name))
        if not self.out:
            raise LtcacheError("no run folder: pass --out (or set out = ... in the recipe)")
        if self.backbone is not None:
            check_backbone(self.backbone, pretrained=self.pretrained)
        if self.loss_params is not None:
            check_loss_params(self.loss, self.loss_params, where="loss_params")
        build_loss(self.loss, [2, 1], self.loss_params)  # a bad loss parameter fails before any work

    def dataset_spec(self):
        from ltcache.data import DatasetSpec

        # The dataset options are flat here (the CLI and recipe surface); DatasetSpec names which ones they are.
        shared = {f.name for f in fields(DatasetSpec)} - {"name"}
        return DatasetSpec(name=self.dataset, **{name: getattr(self, name) for name in shared})

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

_DEVICE = Param("device", str, None, "cpu, cuda or cuda:N (default: CUDA when present).", optional=True)
_JSON = Param("as_json", bool, False, "Print JSON instead of tables.", option="--json")
_SELECT = Param("select", str, "val", "Selection split: val, or train for the simulated-balanced train metric "
                "(App. B.5).", choices=("val", "train"))
_MANY = Param("many", int, 100, "Many-shot: more than this many train images.", low=0)
_FEW = Param("few", int, 20, "Few-shot: fewer than this many train images.", low=0)
_DTYPE = Param("dtype", str, "float32", "Feature dtype in the cache.", choices=("float32", "float16"))

EXTRACT = (
    Param("out", Path, None, "Cache folder to create."),
    Param("root", str, None, "Dataset folder, if it moved since training.", optional=True),
    Param("split_dir", str, None, "Split-file folder, if it moved since training.", optional=True),
    _DTYPE,
    Param("batch_size", int, 512, "Images per forward pass.", low=1),
    Param("workers", int, 0, "Data-loading worker processes.", low=0, high=1024),
    Param("shard_rows", int, 65536, "Rows per HDF5 shard.", low=1),
    _DEVICE,
    Param("overwrite", bool, False, "Replace an existing cache (only once the new one is complete)."),
    Param("train_views", int, 0, "Also store K augmented views of every train image; cRT, LWS, DisAlign and the "
          "other trained heads then sample among them.", low=0, high=1000),
)

COMPARE = (
    Param("methods", str, None, "Comma-separated list, or 'all' (default: the paper's five).", optional=True),
    _SELECT,
    Param("set_", list, [], "Hyperparameter METHOD.PARAM=VALUE (repeatable); see ltcache methods.", option="--set"),
    Param("seed", int, 0, "Seed for cRT, LWS and the other trained heads.", low=0, high=MAX_SEED),
    Param("bootstrap", int, 1000, "Test resamples for the 95% intervals (0: none).", low=0, high=1_000_000),
    Param("seeds", int, 1, "Refit each stochastic method with N seeds: mean and 95% interval.", low=1, high=1000),
    Param("train_views", bool, True, "Fit trained heads on the cache's augmented train views, when it has them "
          "(extract --train-views)."),
    Param("out", Path, None, "Write heads/ and reports/ here instead of into the cache (e.g. a read-only cache).",
          optional=True),
    _JSON, _DEVICE, _MANY, _FEW,
)

SWEEP_TAU = (
    Param("taus", GRID, "0:2:0.1", "Grid: 0,0.5,1 or start:stop:step.", low=0),
    _SELECT, _JSON, _DEVICE, _MANY, _FEW,
)

INFO = (
    Param("verify", bool, False, "Also hash every file and read every split, checking all of it."),
    _JSON,
)

IMPORT_FEATURES = (
    Param("out", Path, None, "Cache folder to create."),
    Param("train", Path, None, "Train features: .npz/.pt with features [n, d] and labels [n], or .npy."),
    Param("test", Path, None, "Test features, same format."),
    Param("val", Path, None, "Val features (without them, select with --select train).", optional=True),
    Param("head", Path, None, ".npz/.pt with the model's classifier: weight [C, d], bias [C].", optional=True),
    Param("class_names", Path, None, "Text file, one class name per line.", optional=True),
    _DTYPE,
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
    _DEVICE,
    Param("overwrite", bool, False, "Replace the run and cache inside --out if they exist (ltcache's only)."),
)


def check_thresholds(many: int, few: int) -> None:
    if few > many:
        raise LtcacheError(f"--few ({few}) must not exceed --many ({many}): the groups would overlap")


# ------------------------------------------------------------------------------------------------ recipes


def load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomllib backport
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"recipe {path} not found; see experiments/ for the shipped recipes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LtcacheError(f"recipe {path} is not a UTF-8 text file; pass a TOML recipe such as "
                           "experiments/digits_lt.toml") from None
    except OSError as exc:
        raise LtcacheError(f"recipe {path} is unreadable ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LtcacheError(f"recipe {path} is not valid TOML ({str(exc).splitlines()[0]})") from None


def train_config_from(values: dict, *, explicit: set[str] = frozenset(), recipe: Path | None = None) -> TrainConfig:
    """Defaults < the TOML recipe < flags given on the command line. Recipe values must have their declared type
    (a string is not a bool, 1.5 is not an integer); unknown keys are an error."""
    declared_params = params_of(TrainConfig)
    merged = {k: v for k, v in values.items() if k in declared_params}
    if recipe is not None:
        table = load_toml(recipe)
        table = table["train"] if isinstance(table.get("train"), dict) else table
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
    return TrainConfig(**merged)


def parse_loss_params(loss: str | None, items) -> dict:
    """['gamma=2', 'drw_epoch=160'] -> {'gamma': 2.0, 'drw_epoch': 160}, typed by the loss's declarations."""
    from ltcache.losses import loss_params

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
    from ltcache.losses import loss_params

    if not isinstance(table, dict):
        raise LtcacheError(f"{where} must be a table of NAME = VALUE")
    declared_params = loss_params(loss)
    unknown = sorted(set(table) - set(declared_params))
    if unknown:
        raise LtcacheError(f"{where}: loss {loss} has no parameter {unknown[0]!r}; it has "
                           f"{', '.join(declared_params) or 'none'}")
    return {key: declared_params[key].check(value, f"{where}.{key}") for key, value in table.items()}
