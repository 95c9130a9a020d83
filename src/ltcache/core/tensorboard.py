"""Optional TensorBoard events (the extra `ltcache[tensorboard]`): train-backbone --tensorboard writes loss, lr,
throughput and val accuracy into RUN/tensorboard, compare --tensorboard each method's row as hparams and metrics and
each trained head's loss curve into OUT/tensorboard. The writer is torch's own (torch.utils.tensorboard), which
needs the `tensorboard` package; without it, asking for events is a one-line error naming the extra."""

from __future__ import annotations

from pathlib import Path

from ltcache.core.errors import LtcacheError

EXTRA = "pip install 'ltcache[tensorboard]'"


def summary_writer(folder: Path):
    """A SummaryWriter writing event files into `folder`, or a one-line error saying how to install TensorBoard."""
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it and says so only with a traceback
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LtcacheError(f"--tensorboard needs the tensorboard package; install it with {EXTRA}, or drop "
                           "--tensorboard") from None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(folder))


def require_tensorboard() -> None:
    """Fail early (before any training or fitting) when --tensorboard was asked for and cannot be written."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise LtcacheError(f"--tensorboard needs the tensorboard package; install it with {EXTRA}, or drop "
                           "--tensorboard") from None
