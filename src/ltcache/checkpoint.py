"""Atomic, versioned stage-1 checkpoints: written to a tmp file then os.replace'd; loaded with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from ltcache.errors import LtcacheError
from ltcache.fsutil import atomic_write

CHECKPOINT_FORMAT = "ltcache-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, *, model, optimizer, scheduler, epoch: int, config: dict, dataset: dict) -> None:
    """Store the unwrapped model and the training state; `config` and `dataset` must be JSON-like."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": config,
        "dataset": dataset,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Load an ltcache checkpoint on the CPU without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"checkpoint {path} not found; pass the checkpoint.pt written by ltcache train-backbone")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        raise LtcacheError(f"{path} is not a readable ltcache checkpoint ({type(exc).__name__}); "
                           "pass the checkpoint.pt written by ltcache train-backbone") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LtcacheError(f"{path} is not an ltcache checkpoint; pass the checkpoint.pt written by "
                           "ltcache train-backbone")
    if state.get("version") != CHECKPOINT_VERSION:
        raise LtcacheError(f"{path} has checkpoint version {state.get('version')}, this ltcache reads "
                           f"version {CHECKPOINT_VERSION}; re-train or use a matching ltcache")
    return state

