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
    """logits = normalize?(f - center) @ weight.T + bias. weight [C, d]; bias [C], center [d] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    normalize_input: bool = False
    center: torch.Tensor | None = None

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
    """logits = f @ weight.T + bias + normalize(f) @ cosine_weight.T: a head on the features plus one on their
    L2-normalized copy (a trained head ensembled with CLIP's zero-shot text head). weight and cosine_weight
    [C, d]; bias [C] or None."""

    weight: torch.Tensor
    cosine_weight: torch.Tensor
    bias: torch.Tensor | None = None

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
        out.addmm_(F.normalize(chunk, dim=1), self.cosine_weight.T)


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
