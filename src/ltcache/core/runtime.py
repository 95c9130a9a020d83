"""Runtime helpers that both stages use: the device, seeding, the cosine schedule and the paper's lr scaling.

Stage 1 (train.py) and stage 2 (stage2/, lab.py) both import from here and never from each other. torch is
imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import random
from typing import TYPE_CHECKING

from ltcache.core.errors import LtcacheError

if TYPE_CHECKING:
    import torch

PAPER_LR, PAPER_BATCH = 0.2, 512  # Sec. 5.1: lr 0.2 at batch 512, scaled linearly with the batch size


def scaled_lr(batch_size: int) -> float:
    """The paper's learning rate for `batch_size`: 0.2 x batch_size / 512."""
    return PAPER_LR * batch_size / PAPER_BATCH


def resolve_device(name: str | None) -> torch.device:
    """The named device, or CUDA when present (this rank's GPU under torchrun), else the CPU."""
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LtcacheError(f"--device {name} asked for CUDA but no GPU is visible; drop --device or use cpu")
        try:
            return torch.device(name)
        except RuntimeError:
            raise LtcacheError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cpu_without_torch(name: str | None) -> bool:
    """Whether `name` (a --device value) surely means the CPU, told without importing torch: `cpu`, or no device
    named on a machine without the NVIDIA driver (no /proc/driver/nvidia), where CUDA cannot be present. A command
    that can run on numpy alone (sweep-tau) then skips torch's import, its largest start-up cost."""
    if name:
        return name == "cpu"
    return not os.path.exists("/proc/driver/nvidia")


def images_to(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; channels_last on CUDA, where convolutions run faster in that layout."""
    import torch

    if device.type == "cuda":
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_factor(step: int, total_steps: int) -> float:
    """(1 + cos(pi * step / total)) / 2: the share of the peak lr at `step` (1 at step 0, 0 after the end)."""
    return 0.5 * (1 + math.cos(math.pi * step / total_steps))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = peak * cosine_factor(step, total): step 0 uses the peak, and it reaches 0 after the end."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps))


_COMMAND: list[str] = []  # the ltcache command line being run, as the CLI parsed it (empty when called from Python)


def record_command(argv: list[str]) -> None:
    """Remember the command line this process runs (the CLI calls this before a command starts)."""
    _COMMAND[:] = [str(part) for part in argv]


def command_line() -> str:
    """How the current work was started, for provenance: the ltcache command line with every option the user gave,
    or, called from Python, `python` and the interpreter's argv."""
    import shlex
    import sys

    return shlex.join(_COMMAND) if _COMMAND else "python " + shlex.join(sys.argv)
