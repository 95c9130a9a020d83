"""What the stage-2 heads that learn share beyond the fitter (ltcache.fitting): the trainer's deviations from the
official stage 2 for their cards, and plans. A trained method is registered with `planned_method` and describes what
it trains as data (Training, Plan), so that every point of a grid and every seed of --seeds that draws the same kind
of batches trains in one pass (run_plans, fitting.train_together)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ltcache.fitting import TRAINING, linear_head, train_on_features  # noqa: F401  (re-exported for the methods)
from ltcache.stage2.cards import Deviation
from ltcache.stage2.core import Fitted, LabData, checked_fit, method

if TYPE_CHECKING:
    import torch
    from torch import nn

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


# ------------------------------------------------------------------------------------------ plans: grids in one pass


@dataclass
class Training:
    """One head to train with SGD, as data: what train_on_features takes. `module` is trained in place."""

    module: nn.Module
    inputs: tuple
    labels: torch.Tensor
    seed: int
    epochs: int
    batch_size: int
    lr: float | None
    weight_decay: float
    momentum: float
    min_steps: int
    sampling_q: float = 0.0
    criterion: nn.Module | None = None
    epoch_rows: int | None = None
    extra: dict = field(default_factory=dict)  # added to what train_on_features reports (train_views)
    precision: str = "float32"  # of the products (fitting.lower_precision)

    def shares_batches_with(self) -> tuple:
        """What decides the batches and the stacking: heads with equal keys train together (their seeds become
        streams). The tensors are compared by identity: the same cached rows, not equal copies."""
        from ltcache.fitting import stack_signature

        return (tuple(id(t) for t in self.inputs), id(self.labels), self.epochs, self.batch_size, self.min_steps,
                self.sampling_q, self.epoch_rows, self.precision, stack_signature(self.module, self.criterion))

    def train_alone(self) -> dict:
        used = train_on_features(self.module, self.inputs, self.labels, seed=self.seed, epochs=self.epochs,
                                 batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                                 momentum=self.momentum, min_steps=self.min_steps, sampling_q=self.sampling_q,
                                 criterion=self.criterion, epoch_rows=self.epoch_rows, precision=self.precision)
        return {**used, **self.extra}


def lab_training(module: nn.Module, data: LabData, inputs=None, *, epochs: int, batch_size: int, lr: float | None,
                 weight_decay: float, momentum: float, min_steps: int, sampling_q: float = 0.0,
                 criterion=None) -> Training:
    """A Training over the rows trained heads fit on (data.fitting): the train features or
    their augmented views (an epoch stays len(train) draws), or row-aligned `inputs` (their cached logits)."""
    split = data.split(data.fitting)
    inputs = split.features if inputs is None else inputs
    return Training(module, inputs if isinstance(inputs, tuple) else (inputs,), split.labels, data.seed, epochs,
                    batch_size, lr, weight_decay, momentum, min_steps, sampling_q, criterion, len(data.train),
                    {"train_views": data.views} if data.fitting == "train_views" else {}, data.precision)


@dataclass
class Plan:
    """What a trained method fits, as data: its trainings, and `finish(used)`, which builds the Fitted from the trained
    modules (`used`: what each training reports, in order). A plan without trainings (cRT's L-BFGS solver) only
    finishes."""

    trainings: list[Training]
    finish: Callable[[list[dict]], Fitted]


def run_plans(plans: list[Plan], *, loss_curves: bool = False) -> list[Fitted]:
    """Train every plan's heads, one pass per group of trainings that draw the same batches (Training.shares_batches_
    with; different seeds become streams of one pass), then finish each plan. Under torchrun, or for a lone
    training, each trains alone (train_on_features, which splits its rows over the ranks). With `loss_curves`, each
    Fitted gets the mean training loss of every epoch of its trainings (Fitted.losses)."""
    from ltcache.core.distributed import get_world_size
    from ltcache.fitting import recording_losses, train_together

    jobs = [(p, t, training) for p, plan in enumerate(plans) for t, training in enumerate(plan.trainings)]
    used: dict[tuple[int, int], dict] = {}
    losses: dict[tuple[int, int], list[float]] = {(p, t): [] for p, t, _ in jobs}
    groups: dict[tuple, list] = {}
    for job in jobs:
        groups.setdefault(job[2].shares_batches_with() if get_world_size() == 1 else (id(job[2]),), []).append(job)
    for members in groups.values():
        if len(members) == 1:
            p, t, training = members[0]
            with recording_losses() if loss_curves else contextlib.nullcontext() as recorded:
                used[p, t] = training.train_alone()
            losses[p, t] = list(recorded or [])
            continue
        first = members[0][2]
        trainings = [training for _, _, training in members]
        results = train_together(
            [t.module for t in trainings], first.inputs, first.labels, seeds=[t.seed for t in trainings],
            epochs=first.epochs, batch_size=first.batch_size, lrs=[t.lr for t in trainings],
            weight_decays=[t.weight_decay for t in trainings], momentums=[t.momentum for t in trainings],
            min_steps=first.min_steps, sampling_q=first.sampling_q,
            criteria=[t.criterion for t in trainings] if first.criterion is not None else None,
            epoch_rows=first.epoch_rows, losses=[losses[p, t] for p, t, _ in members] if loss_curves else None,
            precision=first.precision)
        for (p, t, training), result in zip(members, results, strict=True):
            used[p, t] = {**result, **training.extra}
    fitted = []
    for p, plan in enumerate(plans):
        result = plan.finish([used[p, t] for t in range(len(plan.trainings))])
        if loss_curves:
            curve = [round(v, 6) for t in range(len(plan.trainings)) for v in losses[p, t]]
            result.losses = curve or None
        fitted.append(result)
    return fitted


def fit_points(name: str, runs: list[tuple[LabData, dict]], *, loss_curves: bool = False) -> list[Fitted]:
    """Fit method `name` at every (data, resolved params) of `runs`, each result checked as run_fit checks it.
    A method with a plan trains all its points in as few passes as their batches allow (run_plans); any other
    method (a plugin's) is fitted point by point. The points may differ in their data's seed (compare --seeds)."""
    from ltcache.stage2.core import METHODS, check_data, run_fit

    entry = METHODS[name]
    if entry.plan is None:
        return [run_fit(name, data, params) for data, params in runs]
    for data, _ in runs:
        check_data(name, data)
    fitted = run_plans([entry.plan(data, **params) for data, params in runs], loss_curves=loss_curves)
    return [checked_fit(name, data, result) for (data, _), result in zip(runs, fitted, strict=True)]


def planned_method(name: str, *params, **metadata):
    """Register `plan(data: LabData, **hyperparameters) -> Plan` as trained (stochastic) method `name`: its `fit`
    runs the plan alone, and compare trains the points of its grids and its seeds together. The other arguments are
    those of ltcache.method."""

    def wrap(plan: Callable[..., Plan]) -> Callable[..., Plan]:
        @functools.wraps(plan)
        def fit(data: LabData, **hyperparameters) -> Fitted:
            return run_plans([plan(data, **hyperparameters)])[0]

        method(name, *params, stochastic=True, plan=plan, **metadata)(fit)
        return plan

    return wrap
