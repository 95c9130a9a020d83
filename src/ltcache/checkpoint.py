"""Atomic, versioned stage-1 checkpoints: written to a tmp file then os.replace'd; loaded with weights_only.

A checkpoint holds everything a killed run needs to continue exactly where it stopped (`train-backbone --resume`):
the unwrapped model, optimizer, schedule position, epoch and the random-number state of every process. The
sampler needs no state of its own: its draw depends only on (seed, epoch).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ltcache.errors import LtcacheError
from ltcache.fsutil import atomic_write

CHECKPOINT_FORMAT = "ltcache-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "config": dict, "dataset": dict}


def rng_state() -> dict:
    """This process's random-number state (torch CPU and CUDA, numpy, Python) as tensors and plain values only,
    so it loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, *, model, optimizer, scheduler, epoch: int, config: dict, dataset: dict,
                    rng: list[dict] | None = None) -> None:
    """Store the unwrapped model and the training state; `config` and `dataset` must be JSON-like. `rng` holds the
    random-number state of every process (rank order), taken where the run would continue."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": config,
        "dataset": dataset,
        "rng": rng or [],
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


_NOT_OURS = "pass the checkpoint.pt written by ltcache train-backbone"


def load_checkpoint(path: Path) -> dict:
    """Load an ltcache checkpoint on the CPU without unpickling arbitrary objects; its structure is checked."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"checkpoint {path} not found; {_NOT_OURS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign, pickled or corrupt file
        raise LtcacheError(f"{path} is not a readable ltcache checkpoint ({type(exc).__name__}); {_NOT_OURS}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LtcacheError(f"{path} is not an ltcache checkpoint; {_NOT_OURS}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise LtcacheError(f"{path} has checkpoint version {state.get('version')}, this ltcache reads "
                           f"version {CHECKPOINT_VERSION}; re-train or use a matching ltcache")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise LtcacheError(f"{path} is a damaged ltcache checkpoint ({key!r} is missing or not a {kind.__name__}); "
                               f"{_NOT_OURS}")
    if not isinstance(state["config"].get("backbone"), str):
        raise LtcacheError(f"{path} is a damaged ltcache checkpoint (its config names no backbone); {_NOT_OURS}")
    return state


def load_model_state(model: torch.nn.Module, weights: dict, path: Path, arch: str) -> None:
    """load_state_dict with a one-line error when the weights belong to another architecture or class count."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mismatch = [line.strip() for line in str(exc).splitlines()[1:2]]
        detail = f" ({mismatch[0][:160]})" if mismatch else ""
        raise LtcacheError(f"the weights in {path} do not fit a {arch} for this dataset: {first.rstrip(':.')}"
                           f"{detail}; the checkpoint was written for another architecture or class count") from None
