"""Fitted stage-2 heads: what turns cached features into logits, and how each is stored in CACHE/heads/.

Most methods produce a LinearHead. Three kinds are not linear in the features: a linear head plus one on the
normalized features (the zero-shot ensembles), the MLP head (paper Table 10) and DisAlign's head, whose confidence
gate depends on the feature. Every kind lists its tensors and options, so
cache.py stores and reloads any of them without knowing its math. A new kind is a dataclass registered with
`@head_kind("name")`. torch is imported inside the methods, so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, ClassVar

from ltcache.core.registry import Registry

if TYPE_CHECKING:
    import torch

LOGIT_CHUNK_ROWS = 16384  # rows per chunk: big enough for an efficient GEMM, small enough for its temporaries
HEAD_KINDS: Registry[type[Head]] = Registry("head kind")


def head_kind(name: str):
    """Register a Head subclass under `name`, the kind stored with every saved head of it."""

    def wrap(cls: type[Head]) -> type[Head]:
        cls.kind = name
        HEAD_KINDS.add(name, cls)
        return cls

    return wrap


class Head:
    """logits(features) in row chunks, so a large split never needs a second full-size copy of its features."""

    kind: ClassVar[str]

    def chunk_logits(self, features: torch.Tensor, out: torch.Tensor) -> None:
        """Write the logits of `features` into `out` (a slice of the result)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N, C], written chunk by chunk into one preallocated result (no concatenation copy). float16
        features (a float16 cache) are upcast a chunk at a time."""
        import torch

        from ltcache.logits import as_float32

        head = self.to(features.device)
        out = features.new_empty((len(features), self.num_classes), dtype=torch.float32)
        for start in range(0, len(features), LOGIT_CHUNK_ROWS):
            rows = slice(start, start + LOGIT_CHUNK_ROWS)
            head.chunk_logits(as_float32(features[rows]), out[rows])
        return out

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """argmax of the logits, a chunk of rows at a time: no [N, C] matrix is held."""
        import torch

        from ltcache.logits import chunk_rows

        head, rows = self.to(features.device), max(1024, chunk_rows(self.num_classes))
        parts = [head.logits(features[start : start + rows]).argmax(1) for start in range(0, len(features), rows)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=features.device)

    def to(self, device) -> Head:
        """The same head with every tensor on `device`."""
        import torch

        moved = {f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for f in fields(self) for v in [getattr(self, f.name)]}
        return type(self)(**moved)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The named tensors to store (None-valued fields are left out)."""
        import torch

        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def options(self) -> dict:
        """The non-tensor fields, stored as attributes."""
        import torch

        return {f.name: getattr(self, f.name) for f in fields(self)
                if not isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name) is not None}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], options: dict) -> Head:
        return cls(**tensors, **options)


@head_kind("linear")
@dataclass
class LinearHead(Head):
    """logits = normalize?(g - center) @ weight.T + bias, g = f @ projection (or f). weight [C, d]; bias [C], center
    [d] or None; projection [d_in, d] or None (CLIP's image projection: a text head over pre-projection features)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    normalize_input: bool = False
    center: torch.Tensor | None = None
    projection: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.weight)

    def with_bias(self, bias: torch.Tensor) -> LinearHead:
        """This head, bias-free, with `bias` added (what BlockLogits.with_bias builds on)."""
        if self.bias is not None:
            raise TypeError("with_bias needs a LinearHead without bias")
        return replace(self, bias=bias)

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        import torch
        import torch.nn.functional as F

        chunk = project(chunk, self.projection)
        if self.center is not None:
            chunk = chunk - self.center
        if self.normalize_input:
            chunk = F.normalize(chunk, dim=1)
        if self.bias is None:
            torch.mm(chunk, self.weight.T, out=out)
        else:
            torch.addmm(self.bias.to(chunk.dtype), chunk, self.weight.T, out=out)


@head_kind("linear_cosine")
@dataclass
class LinearCosineHead(Head):
    """logits = f @ weight.T + bias + normalize(f @ projection) @ cosine_weight.T: a head on the features plus one on
    their L2-normalized (projected) copy (a trained head ensembled with CLIP's zero-shot text head). weight [C, d],
    cosine_weight [C, d'] (d' = d without a projection); bias [C] or None."""

    weight: torch.Tensor
    cosine_weight: torch.Tensor
    bias: torch.Tensor | None = None
    projection: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.weight)

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        import torch
        import torch.nn.functional as F

        if self.bias is None:
            torch.mm(chunk, self.weight.T, out=out)
        else:
            torch.addmm(self.bias.to(chunk.dtype), chunk, self.weight.T, out=out)
        out.addmm_(F.normalize(project(chunk, self.projection), dim=1), self.cosine_weight.T)


@head_kind("mlp")
@dataclass
class MLPHead(Head):
    """Linear layers with ReLU between them (paper Appendix B.6): weight{i} [out, in], bias{i} [out]."""

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]

    @property
    def num_classes(self) -> int:
        return len(self.weights[-1])

    @property
    def weight(self) -> torch.Tensor:  # the output layer, for the weight-norm plot
        return self.weights[-1]

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        import torch
        import torch.nn.functional as F

        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            chunk = F.relu(F.linear(chunk, weight, bias))
        torch.addmm(self.biases[-1], chunk, self.weights[-1].T, out=out)

    def to(self, device) -> MLPHead:
        return MLPHead(tuple(w.to(device) for w in self.weights), tuple(b.to(device) for b in self.biases))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"weight{i}": w for i, w in enumerate(self.weights)},
                **{f"bias{i}": b for i, b in enumerate(self.biases)}}

    def options(self) -> dict:
        return {}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], options: dict) -> MLPHead:
        layers = sum(1 for name in tensors if name.startswith("weight"))
        return cls(*(tuple(tensors[f"{name}{i}"] for i in range(layers)) for name in ("weight", "bias")))


@head_kind("disalign")
@dataclass
class DisAlignHead(Head):
    """DisAlign (Zhang et al. 2021): z = f @ W.T + b from the joint head; per-class magnitude alpha and margin beta;
    a confidence gate sigma(f . v + c). logits = z + sigma * ((alpha - 1) * z + beta)."""

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    confidence_weight: torch.Tensor
    confidence_bias: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.weight)

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        joint = torch.addmm(self.bias, chunk, self.weight.T)
        out.copy_(adjust_disalign(joint, chunk, self.alpha, self.beta, self.confidence_weight, self.confidence_bias))


def adjust_disalign(joint_logits, features, alpha, beta, confidence_weight, confidence_bias) -> torch.Tensor:
    """sigma(x) * (alpha * z + beta) + (1 - sigma(x)) * z, written as one correction of z."""
    import torch

    gate = torch.sigmoid(features @ confidence_weight + confidence_bias)[:, None]
    return joint_logits + gate * ((alpha - 1) * joint_logits + beta)


# ------------------------------------------------------------------------- heads that keep the train features

NEIGHBOUR_TILE = 1 << 22  # similarities computed at a time (16 MiB of float32): never a queries x keys matrix whole


def nearest_keys(queries: torch.Tensor, keys: torch.Tensor, k: int, *, tile: int = NEIGHBOUR_TILE,
                 skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, key indices) [n, k] of the k keys with the largest dot product with each query, best first,
    computed a tile of [rows, key block] at a time with a running top-k, so no n x M matrix is held. `skip`: one key
    index per query that may not be its own neighbour (leave-one-out when the queries are the keys)."""
    import torch

    count, total = len(queries), len(keys)
    k = min(k, total)
    key_block = min(total, max(k, 4096))
    row_block = max(1, tile // max(1, key_block))
    sims_out = queries.new_empty((count, k), dtype=torch.float32)
    index_out = torch.empty((count, k), dtype=torch.int64, device=queries.device)
    for start in range(0, count, row_block):
        rows = slice(start, start + row_block)
        query = queries[rows].float()
        best_sims = best_index = None
        for first in range(0, total, key_block):
            sims = query @ keys[first : first + key_block].float().T
            if skip is not None:
                own = skip[rows] - first
                inside = (own >= 0) & (own < sims.shape[1])
                sims[inside.nonzero()[:, 0], own[inside]] = float("-inf")
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            values, index = top.values, top.indices + first
            if best_sims is not None:
                values, order = torch.cat([best_sims, values], 1).topk(k, dim=1)
                index = torch.cat([best_index, index], 1).gather(1, order)
            best_sims, best_index = values, index
        sims_out[rows], index_out[rows] = best_sims, best_index
    return sims_out, index_out


VOTE_FLOOR = 1e-30  # a class without a neighbour's vote gets log(1e-30) = -69: finite logits for calibration


def knn_log_votes(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                  temperature: float) -> torch.Tensor:
    """log of DINOv2's kNN vote (dinov2/eval/knn.py): the neighbours' weights softmax(s / T) summed per class."""
    import torch

    weights = torch.softmax(sims / temperature, dim=1)
    votes = torch.zeros(len(sims), num_classes, dtype=torch.float32, device=sims.device)
    votes.scatter_add_(1, neighbour_labels, weights)
    return votes.clamp_min_(VOTE_FLOOR).log_()


@head_kind("knn")
@dataclass
class KnnHead(Head):
    """k-nearest-neighbour vote over cosine similarity (DINOv2's protocol): keys [M, d] the L2-normalized train
    features, key_labels [M]; logits = log sum over the k nearest keys of softmax(s / temperature) per class."""

    keys: torch.Tensor
    key_labels: torch.Tensor
    classes: int
    k: int = 20
    temperature: float = 0.07

    @property
    def num_classes(self) -> int:
        return self.classes

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        import torch.nn.functional as F

        sims, index = nearest_keys(F.normalize(chunk, dim=1), self.keys, self.k)
        out.copy_(knn_log_votes(sims, self.key_labels[index], self.classes, self.temperature))


def project(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """`features` @ `projection` (a CLIP image tower's projection, for a cache of pre-projection features), or the
    features as they are."""
    return features if projection is None else features @ projection


def cache_adapter_logits(features: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, num_classes: int,
                         beta: float, *, tile: int = NEIGHBOUR_TILE) -> torch.Tensor:
    """Tip-Adapter's cache logits exp(-beta (1 - f . k)) @ one_hot(key labels), a block of keys at a time (the
    one-hot product is a column index_add)."""
    import torch

    out = torch.zeros(len(features), num_classes, dtype=torch.float32, device=features.device)
    block = max(1, tile // max(1, len(features)))
    for first in range(0, len(keys), block):
        affinity = features @ keys[first : first + block].float().T
        out.index_add_(1, key_labels[first : first + block], affinity.sub_(1).mul_(beta).exp_())
    return out


@head_kind("cache_adapter")
@dataclass
class CacheAdapterHead(Head):
    """Tip-Adapter (Zhang et al. 2022): CLIP's zero-shot logits plus alpha * exp(-beta (1 - g . k)) over the cache's
    keys [M, d] and their one-hot labels, g = normalize(f @ projection). text_weight [C, d]: the zero-shot head
    (logit scale included)."""

    text_weight: torch.Tensor
    keys: torch.Tensor
    key_labels: torch.Tensor
    alpha: float = 1.0
    beta: float = 1.0
    projection: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.text_weight)

    def chunk_logits(self, chunk: torch.Tensor, out: torch.Tensor) -> None:
        import torch
        import torch.nn.functional as F

        features = F.normalize(project(chunk, self.projection), dim=1)
        for start in range(0, len(features), 4096):
            rows = slice(start, start + 4096)
            torch.mm(features[rows], self.text_weight.T, out=out[rows])
            out[rows].add_(cache_adapter_logits(features[rows], self.keys, self.key_labels, self.num_classes,
                                                self.beta), alpha=self.alpha)
