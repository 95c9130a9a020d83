"""DatasetSpec: which long-tailed dataset, as the user asked for it (a train-backbone option group and a recipe
table). Declared here, in the data layer, so that the dataset builders and stage 1's config share it without an
import cycle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ltcache.core.params import declared
from ltcache.core.registry import Registry

# The dataset builders (builder(spec) -> LongTailData). The modules that register the built-in ones are imported on
# the registry's first use, so naming the datasets costs no numpy or torch.
DATASETS: Registry = Registry("dataset", builtins=("ltcache.data.datasets", "ltcache.data.cifar",
                                                   "ltcache.data.files", "ltcache.data.tars", "ltcache.data.hf"))


def dataset_registry() -> Registry:
    """The dataset registry, as a declaration's `choices` (its names are read when a value is checked)."""
    return DATASETS


@dataclass(frozen=True)
class DatasetSpec:
    """Which long-tailed dataset, as the user asked for it; the dataset's builder fills the None fields with its
    defaults. Each declared field is a train-backbone option and a recipe key (`name` is --dataset / dataset)."""

    name: str = declared("digits-lt", "Registered dataset name.", choices=dataset_registry)
    root: str | None = declared(None, "Dataset folder (fashion-mnist-lt: the idx files).")
    imbalance_factor: float | None = declared(None, "n_max / n_min of the long-tail profile (dataset default).",
                                              low=1)
    n_max: int | None = declared(None, "Train images of the most frequent class (dataset default).", low=1,
                                    high=10**8)
    seed: int = 0  # the split's seed: the run's seed (TrainConfig.seed), not an option of its own
    val_per_class: int | None = declared(None, "Balanced val images per class (dataset default).", low=0,
                                            high=10**8)
    image_size: int | None = declared(None, "Crop size for file datasets (default 224).", low=1, high=8192)
    split_dir: str | None = declared(None, "Folder with the split files (default: --root).")
    profile: str | None = declared(None, "imagefolder long tail.", choices=("exponential", "step", "none"))
    download: bool = declared(False, "cifar*-lt: let torchvision download the data (needs internet).")
    image_column: str = declared("image", "hf: the column that holds the images (an Image feature: bytes or a path).")
    label_column: str = declared("label", "hf: the column that holds the integer class labels.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, described: dict, **overrides) -> DatasetSpec:
        """Rebuild a spec from a manifest's or checkpoint's dataset description (extra keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in described.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
