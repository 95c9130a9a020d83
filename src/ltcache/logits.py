"""Logits under a memory budget: a split's N x C logits are held whole only when they fit the budget, and are
otherwise produced in row blocks each time they are read, so that no stage-2 method needs an N x C matrix.

At iNaturalist 2018 shape the train logits are 437,513 x 8,142 x 4 B = 14.2 GB. The default budget is a quarter
of the machine's RAM, or of the GPU's memory on CUDA (`--memory-budget`): 5.9 GiB on a 24 GiB machine, so there
they are never materialized. LWS, learned tau and DisAlign then compute each batch's rows from the features (one
[batch, d] x [d, C] product, the same work as cRT's forward pass), and the tau / logit-adjustment grids, scoring,
calibration and temperature scaling read them block by block. At ImageNet-LT shape (115,846 x 1,000: 0.46 GB)
they fit, and nothing changes.

Features may be float16 (a float16 cache, memory-mapped as is): every block is upcast to float32 on its way in.
torch is imported inside the functions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ltcache.core.errors import LtcacheError
from ltcache.core.options import PRECISIONS

if TYPE_CHECKING:
    import torch


class LogitHead(Protocol):
    """What blocked logits need of a head (ltcache.heads.Head has it): its class count and its logits, whole or
    written into a chunk. Declared here so that this module, below heads.py, imports nothing of it."""

    @property
    def num_classes(self) -> int: ...

    def logits(self, features: torch.Tensor) -> torch.Tensor: ...

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None: ...

    def to(self, device) -> LogitHead: ...

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32: the temporaries of a softmax or top-k over a chunk stay this small
MIN_BLOCK_ROWS = 1024  # below this a block's GEMM is inefficient; a budget that small still gets 1024-row blocks
FALLBACK_BUDGET = 4 << 30  # where the machine's RAM cannot be read
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


EXP_FLOOR = -87.0  # e^-87 = 1.6e-38, just above float32's smallest normal number


def exp_shifted_(shifted: torch.Tensor) -> torch.Tensor:
    """exp, in place, of logits minus their row maximum (all <= 0). Values below EXP_FLOOR are raised to it first:
    their exp would be a subnormal float, which x86 computes through a slow path (21 ms instead of 1.2 ms for a
    512 x 8,142 batch of trained logits), and e^-87 changes neither a row's sum (>= 1) nor any probability that
    matters in float32."""
    return shifted.clamp_(min=EXP_FLOOR).exp_()


def parse_size(text: str | int, label: str = "--memory-budget") -> int:
    """'512M', '4G', '1.5G', '8GiB' or a plain byte count, as bytes (binary units); at least 1 KiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
        if match is None:
            raise LtcacheError(f"{label} {text!r} is not a size; give bytes with a unit, e.g. 512M or 4G")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < (1 << 10):
        raise LtcacheError(f"{label} {text!r} is below 1 KiB; give a larger size, e.g. 512M or 4G")
    return value


def machine_memory() -> int | None:
    """Physical RAM in bytes, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device=None) -> int:
    """A quarter of the memory the logits live in: the GPU's on CUDA, else the machine's RAM (4 GiB where it
    cannot be read). That leaves room for the cache beside them."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory // 4
    total = machine_memory()
    return total // 4 if total else FALLBACK_BUDGET


def matrix_product(precision: str, device=None):
    """`product(rows, weight) -> float32 numpy logits rows @ weight.T` for numpy inputs, on `device` (a torch device;
    None: the CPU) in `precision`: float32, or bf16 (inputs rounded to bfloat16; the products accumulate in float32
    on CPUs with AVX-512 BF16 or AMX and on GPUs, and the logits come back as float32). float32 on the CPU is numpy's
    own matmul, which needs no torch."""
    import numpy as np

    if precision not in PRECISIONS:
        raise LtcacheError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cpu = device is None or getattr(device, "type", str(device)) == "cpu"
    if precision == "float32" and cpu:
        return lambda rows, weight: np.asarray(rows, dtype=np.float32) @ np.asarray(weight, dtype=np.float32).T
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cached: dict = {}

    def product(rows, weight):
        key = id(weight)
        if key not in cached:  # the weight is moved and rounded once per matrix, not per block
            cached.clear()
            cached[key] = (weight, torch.from_numpy(np.ascontiguousarray(weight)).to(device or "cpu", dtype).T)
        block = torch.from_numpy(np.ascontiguousarray(rows)).to(device or "cpu", dtype)
        return (block @ cached[key][1]).float().cpu().numpy()

    return product


def resolve_budget(budget: str | int | None, device=None) -> int:
    """The budget in bytes: `budget` parsed, or the default for `device`."""
    return default_budget(device) if budget is None else parse_size(budget)


def fits(rows: int, columns: int, budget: int) -> bool:
    """Whether a float32 [rows, columns] matrix fits in `budget` bytes."""
    return rows * columns * 4 <= budget


def chunk_rows(columns: int) -> int:
    """Rows of a chunk whose per-element temporaries (softmax, exp, top-k) stay near CHUNK_ELEMENTS floats."""
    return max(64, CHUNK_ELEMENTS // max(1, columns))


def block_rows(columns: int, budget: int) -> int:
    """Rows of a float32 [rows, columns] block within `budget` (at least MIN_BLOCK_ROWS)."""
    return max(MIN_BLOCK_ROWS, budget // max(1, 4 * columns))


def as_float32(features: torch.Tensor) -> torch.Tensor:
    """`features` in float32 (a float16 cache's rows upcast; float32 rows returned as they are)."""
    import torch

    return features if features.dtype == torch.float32 else features.float()


@dataclass
class BlockLogits:
    """The logits of `head` over `features`, never held whole: `blocks()` computes `block_rows` rows at a time, and
    `gather(index, out)` the rows of a batch. What a method gets from LabData.raw_logits (and the lab from
    Lab.logits) when the full matrix would not fit the memory budget; read it through `row_blocks`."""

    head: LogitHead
    features: torch.Tensor
    block_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.features), self.head.num_classes)

    @property
    def device(self):
        return self.features.device

    def blocks(self) -> Iterator[torch.Tensor]:
        """The logits, `block_rows` rows at a time, in row order."""
        for start in range(0, len(self.features), self.block_rows):
            yield self.head.logits(self.features[start : start + self.block_rows])

    def gather(self, index: torch.Tensor, out: torch.Tensor, feature_buffer: torch.Tensor) -> None:
        """Write the logits of rows `index` into `out`, through `feature_buffer` ([len(index), d] float32)."""
        import torch

        if self.features.dtype == feature_buffer.dtype:
            torch.index_select(self.features, 0, index, out=feature_buffer)
        else:
            feature_buffer.copy_(self.features.index_select(0, index))
        self.head.to(out.device).chunk_logits(feature_buffer, out)

    def with_bias(self, bias: torch.Tensor | None) -> BlockLogits:
        """These logits plus `bias` (a LinearHead without bias gains it: its `with_bias`)."""
        if bias is None:
            return self
        if not hasattr(self.head, "with_bias"):
            raise TypeError("with_bias needs the bias-free logits of a LinearHead")
        return BlockLogits(self.head.with_bias(bias), self.features, self.block_rows)


def logits_within(head: LogitHead, features: torch.Tensor, budget: int):
    """The logits of `head` over `features`: one tensor when they fit `budget`, else a BlockLogits."""
    if fits(len(features), head.num_classes, budget):
        return head.logits(features)
    return BlockLogits(head, features, block_rows(head.num_classes, budget))


def row_blocks(logits, rows: int) -> Iterator[torch.Tensor]:
    """`logits` (a tensor or a BlockLogits) as consecutive blocks of at most `rows` rows, in row order; at most one
    computed block is alive at a time."""
    if isinstance(logits, BlockLogits):
        for block in logits.blocks():
            yield from block.split(rows)
    else:
        yield from logits.split(rows)


def labelled_blocks(logits, labels: torch.Tensor, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(block, its labels) for the row blocks of `logits` (row_blocks), the labels sliced at a running offset: a
    BlockLogits' blocks need not be a multiple of `rows`, so splitting the labels by `rows` would fall out of step."""
    start = 0
    for block in row_blocks(logits, rows):
        yield block, labels[start : start + len(block)]
        start += len(block)
    if start != len(labels):
        raise ValueError(f"{start} rows of logits for {len(labels)} labels")


def argmax_rows(logits, rows: int = 16384) -> torch.Tensor:
    """argmax over classes of every row (a tensor or a BlockLogits), block by block."""
    import torch

    parts = [block.argmax(1) for block in row_blocks(logits, rows)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
