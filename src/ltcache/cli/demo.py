"""`ltcache demo`: digits-LT end to end (train -> extract -> compare) on a laptop CPU."""

from __future__ import annotations

import time
from pathlib import Path

from ltcache.core.console import log
from ltcache.core.params import checked
from ltcache.lab import Comparison, compare
from ltcache.stage1.config import DEMO, TrainConfig
from ltcache.stage1.extract import extract
from ltcache.stage1.train import fit

DEMO_EPOCHS = 40
# The stage-1 recipe of the demo; experiments/digits_lt.toml holds the same values.
DEMO_RECIPE = {"dataset": "digits-lt", "backbone": "smallresnet8", "batch_size": 32, "lr": 0.05}


def fresh_folder(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first that does not exist yet, so a rerun never overwrites."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


@checked(*DEMO)
def run_demo(out: Path, *, epochs: int = DEMO_EPOCHS, seed: int = 0, overwrite: bool = False,
             device: str | None = None) -> tuple[Comparison, float]:
    """Train a small ResNet on digits-LT, cache its features, compare the paper's five stage-2 methods. Returns
    the comparison and the seconds the whole run took."""
    start = time.perf_counter()
    run_dir = fit(TrainConfig.from_options(out=str(out / "run"), **DEMO_RECIPE, epochs=epochs, seed=seed, device=device,
                              overwrite=overwrite))
    cache = extract(run_dir / "checkpoint.pt", out / "cache", device=device, overwrite=overwrite)
    log(f"cache written to {cache}")
    comparison = compare(cache, seed=seed, device=device, log=log)
    return comparison, round(time.perf_counter() - start, 1)
