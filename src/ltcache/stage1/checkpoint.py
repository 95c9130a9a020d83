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

from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import atomic_write

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
    return checked_state(state, path)


def checked_state(state: dict, path: Path) -> dict:
    """The structure of a loaded ltcache checkpoint (version, required keys, a named backbone), checked."""
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


# ------------------------------------------------------------------ starting weights: ltcache or official checkpoints

OFFICIAL = "classifier-balancing"
_OFFICIAL_PARTS = {"feat_model": "backbone.", "classifier": ""}  # the official networks -> ltcache's Classifier


def _load_any(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"checkpoint {path} not found; pass an ltcache checkpoint.pt or a classifier-balancing "
                           "final_model_checkpoint.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects beyond tensors, or a damaged file
        raise LtcacheError(f"{path} is not a readable checkpoint ({type(exc).__name__}: a damaged file, or pickled "
                           "objects beyond tensors, which ltcache never unpickles); pass an ltcache checkpoint.pt or "
                           "a classifier-balancing final_model_checkpoint.pth") from None
    if not isinstance(state, dict):
        raise LtcacheError(f"{path} holds a {type(state).__name__}, not a checkpoint dictionary")
    return state


def official_weights(networks: dict, path: Path) -> dict:
    """Map a classifier-balancing `state_dict_best` ({'feat_model': ..., 'classifier': ...}, keys prefixed by
    nn.DataParallel's `module.`) onto ltcache's Classifier names: feat_model's `conv1.weight` ->
    `backbone.conv1.weight`, the DotProduct classifier's `fc.weight` -> `fc.weight`. A network or key that does not
    map is an error naming it."""
    missing = [part for part in _OFFICIAL_PARTS if not isinstance(networks.get(part), dict)]
    if missing:
        raise LtcacheError(f"{path}: state_dict_best has no {missing[0]!r} network (it has "
                           f"{', '.join(map(str, networks)) or 'none'}); ltcache reads the official feat_model + "
                           "DotProduct classifier checkpoints")
    extra = sorted(set(networks) - set(_OFFICIAL_PARTS))
    if extra:
        raise LtcacheError(f"{path}: state_dict_best holds network {extra[0]!r}, which ltcache cannot map (only "
                           "feat_model and a DotProduct classifier); cache its features with its own code and "
                           "ltcache import-features")
    weights = {}
    for part, prefix in _OFFICIAL_PARTS.items():
        for key, tensor in networks[part].items():
            name = key.removeprefix("module.")
            if part == "classifier" and name not in ("fc.weight", "fc.bias"):
                raise LtcacheError(f"{path}: classifier key {key!r} does not map onto a linear classifier (fc.weight, "
                                   "fc.bias); only the DotProduct classifier is supported")
            if not isinstance(tensor, torch.Tensor):
                raise LtcacheError(f"{path}: {part} key {key!r} is not a tensor")
            weights[prefix + name] = tensor
    return weights


def read_weights(path: Path) -> tuple[dict, dict]:
    """Model weights in ltcache's names from an ltcache checkpoint or an official classifier-balancing one, and what
    is known of them: {'format', 'arch' (None for official checkpoints: they do not record it), 'epoch'}."""
    path = Path(path)
    state = _load_any(path)
    if state.get("format") == CHECKPOINT_FORMAT:
        state = checked_state(state, path)  # loaded once: a large checkpoint is not read twice
        return state["model"], {"format": CHECKPOINT_FORMAT, "arch": state["config"]["backbone"],
                                "epoch": state["epoch"], "dataset": state["dataset"], "config": state["config"]}
    networks = state.get("state_dict_best", state.get("state_dict"))
    if not isinstance(networks, dict) or not {"feat_model", "classifier"} & set(networks):
        raise LtcacheError(f"{path} is neither an ltcache checkpoint nor a classifier-balancing one (no "
                           "'state_dict_best'); pass checkpoint.pt from ltcache train-backbone or the official "
                           "final_model_checkpoint.pth")
    epoch = state.get("best_epoch", state.get("epoch"))
    return official_weights(networks, path), {"format": OFFICIAL, "arch": None,
                                              "epoch": int(epoch) if isinstance(epoch, int) else None}


def load_weights_into(model: torch.nn.Module, weights: dict, path: Path, arch: str) -> None:
    """Like load_model_state, but a key the model lacks, or one it has that the checkpoint lacks, is named."""
    own = model.state_dict()
    unknown = [key for key in weights if key not in own]
    if unknown:
        raise LtcacheError(f"{path}: key {unknown[0]!r} has no place in a {arch} (the checkpoint is another "
                           "architecture, or one with extra layers); pass --backbone matching the checkpoint")
    absent = [key for key in own if key not in weights and not key.endswith("num_batches_tracked")]
    if absent:
        raise LtcacheError(f"{path} has no weights for {absent[0]!r} of a {arch}; pass --backbone matching the "
                           "checkpoint")
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise LtcacheError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, a {arch} for this dataset needs "
                               f"{tuple(own[key].shape)}; the checkpoint is another architecture or class count")
    model.load_state_dict(weights, strict=False)
