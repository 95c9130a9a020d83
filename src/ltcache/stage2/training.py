"""What the stage-2 heads that learn share beyond the fitter (ltcache.fitting): the `trained_method` decorator,
the trainer's deviations from the official stage 2 for their cards, and fitting on the lab's train rows."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ltcache.fitting import (  # noqa: F401  (re-exported for the method modules and plugins)
    BALANCED_DEFAULTS,
    TRAINING,
    EpochProgress,
    batch_normalizer,
    linear_head,
    sum_gradients,
    train_on_features,
)
from ltcache.stage2.cards import Deviation
from ltcache.stage2.core import LabData, method

if TYPE_CHECKING:
    from torch import nn

# Every method trained with SGD from a seed: compare --seeds N refits it N times.
trained_method = functools.partial(method, stochastic=True)

# How the trainer every learned head shares departs from the official stage 2 (classifier-balancing's run_networks.py),
# for the cards of the methods trained with it.
TRAINER_DEVIATIONS = (
    Deviation("Batches are drawn i.i.d. by Eq. 1 from the cached features (q = 0: class-balanced), one view per image "
              "unless the cache has extract --train-views.",
              "The official code samples images with its class-aware sampler (4 per visited class) and augments "
              "them every epoch; stage 2 works on cached tensors, and Eq. 1 gives the same class marginal."),
    Deviation("The cosine lr is stepped every iteration, from the peak to 0.",
              "The official run_networks.py steps it once per epoch, before the epoch, so its last epoch runs at lr 0 "
              "(9 effective epochs of 10); one schedule for every trained head."),
    Deviation("The head of the last epoch is returned.",
              "The official code keeps the epoch with the best val accuracy, a choice of epoch on the selection "
              "split; ltcache leaves the schedule's end as the method's point (choose epochs with --set, on val)."),
    Deviation("min_steps lengthens epochs on tiny datasets (500 steps in all by default).",
              "Ten epochs of a few batches do not converge on toy caches; at ImageNet-LT scale (227 steps an epoch) "
              "it is inactive."),
)


def fit_on_train(module: nn.Module, data: LabData, inputs=None, **hyperparameters) -> dict:
    """train_on_features over the rows trained heads fit on (data.fitting): the train features, or their K
    augmented views when the cache has them (an epoch stays len(train) draws). `inputs` defaults to the
    features of those rows; pass row-aligned tensors (e.g. their cached logits) to train on something else."""
    split = data.split(data.fitting)
    used = train_on_features(module, split.features if inputs is None else inputs, split.labels, seed=data.seed,
                             epoch_rows=len(data.train), **hyperparameters)
    return {**used, "train_views": data.views} if data.fitting == "train_views" else used


def retrain_linear(data: LabData, **hyperparameters) -> tuple[nn.Linear, dict]:
    """A freshly initialized linear classifier trained on the frozen train features."""
    import torch
    from torch import nn

    torch.manual_seed(data.seed)
    linear = nn.Linear(data.train.features.shape[1], data.num_classes).to(data.train.features.device)
    return linear, fit_on_train(linear, data, **hyperparameters)
