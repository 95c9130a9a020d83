"""Datasets, long-tail profiles and samplers."""

from ltcache.data.datasets import DATASETS, SPLITS, DatasetSpec, LongTailData, build_dataset

__all__ = ["DATASETS", "SPLITS", "DatasetSpec", "LongTailData", "build_dataset"]
