"""Datasets, long-tail profiles and samplers."""

from ltcache.data import cifar, files  # noqa: F401  (registers cifar10-lt, cifar100-lt, imagenet-lt, ...)
from ltcache.data.datasets import DATASETS, SPLITS, DatasetSpec, LongTailData, build_dataset

__all__ = ["DATASETS", "SPLITS", "DatasetSpec", "LongTailData", "build_dataset"]
