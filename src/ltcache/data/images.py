"""The torch Datasets behind every registered dataset: in-memory arrays, image files, images in tar shards and in
Arrow columns (Hugging Face datasets).
Imported when a dataset is built, never when the registry is listed or a name is checked."""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ltcache.core.errors import LtcacheError


class SplitDataset(Dataset):
    """One split: int64 `labels`, a `transform`; items are (transformed image, label, row index in the split)."""

    labels: torch.Tensor
    transform: Callable

    def __len__(self) -> int:
        return len(self.labels)

    def with_transform(self, transform) -> SplitDataset:
        """The same rows with another transform (extract uses the test-time one on train)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone


class ArrayImageDataset(SplitDataset):
    """In-memory uint8 images [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i], i


class FileImageDataset(SplitDataset):
    """Image files decoded with PIL as RGB."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform):
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise LtcacheError(f"cannot decode image {self.paths[i]} ({type(exc).__name__}); replace the file "
                               "or drop its line from the split file") from None
        return self.transform(rgb), self.labels[i], i


class TarImageDataset(SplitDataset):
    """Images read from tar shards at their member offsets and decoded with PIL as RGB. Items are (image, label,
    row index), like the other split datasets."""

    def __init__(self, shards: list[str], members: list[tuple[int, int, int, str]], labels: np.ndarray, transform):
        self.shards, self.members = shards, members  # members: (shard number, offset, size, name)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform
        self._files: dict[int, int] = {}  # opened per process (DataLoader workers each open their own)

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self):  # a worker opens its own files
        return {**self.__dict__, "_files": {}}

    def __getitem__(self, i: int):
        shard, offset, size, name = self.members[i]
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)  # kept open for the next reads
        data = os.pread(fd, size, offset)  # no shared file position: safe in forked DataLoader workers
        try:
            if len(data) != size:
                raise OSError("the shard is shorter than its index")
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise LtcacheError(f"cannot decode {name} in {self.shards[shard]} ({type(exc).__name__}); replace the "
                               "shard") from None
        return self.transform(rgb), self.labels[i], i


class ArrowImageDataset(SplitDataset):
    """Images in an Arrow column (--dataset hf: Image feature structs of bytes and path, raw bytes, or paths relative
    to `root`), rows `rows` of it, decoded with PIL as RGB when read."""

    def __init__(self, column, rows: np.ndarray, labels: np.ndarray, transform, root):
        self.column, self.rows, self.root = column, np.asarray(rows, dtype=np.int64), root
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.transform = transform

    def image(self, i: int) -> Image.Image:
        value = self.column[int(self.rows[i])].as_py()
        data, path = value, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, str):
            data, path = None, value
        try:
            if data is not None:
                with Image.open(io.BytesIO(data)) as image:
                    return image.convert("RGB")
            if path:
                with Image.open(os.path.join(self.root, path)) as image:
                    return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise LtcacheError(f"cannot decode image {i} of an hf split ({type(exc).__name__}); the row's image is "
                               "damaged") from None
        raise LtcacheError(f"image {i} of an hf split has neither bytes nor a path")

    def __getitem__(self, i: int):
        return self.transform(self.image(i)), self.labels[i], i
