"""One pass for a grid (issue 23): every trained method's grid points, and the replicates of --seeds, train together
in one pass per group of points that draw the same batches, and each point's head equals the head of that point
fitted alone with the same seed (train_on_features, torch.optim.SGD), to float rounding."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from conftest import write_toy_cache
from ltcache import open_lab
from ltcache.heads import LinearHead
from ltcache.stage2 import METHODS
from ltcache.stage2.core import resolve_params
from ltcache.stage2.training import fit_points

TOY = {"epochs": 2, "batch_size": 16, "min_steps": 30}  # toy caches need toy hyperparameters
# For each trained method: the grid over which its one-pass heads are checked (lr, weight decay and momentum vary
# within a group; a method's own hyperparameters vary what its modules and criteria hold), and the number of passes
# its grid needs (points whose inputs or shapes differ cannot share one).
GRIDS = {
    "crt": ({"lr": [0.05, 0.3], "weight_decay": [0.0, 5e-3], "momentum": [0.9, 0.5]}, 1),
    "crt_bsm": ({"lr": [0.05, 0.3], "weight_decay": [0.0, 5e-3]}, 1),
    "crt_las": ({"lr": [0.05, 0.3], "smooth_head": [0.4, 0.2], "smooth_tail": [0.1, 0.0]}, 1),
    "crt_maxnorm": ({"lr": [0.05, 0.3], "max_norms": [[0.5, 1.0, 2.0]]}, 1),
    "cos": ({"lr": [0.05, 0.3], "scale": [16.0, 4.0]}, 1),
    "cos_la": ({"lr": [0.05, 0.3], "tau": [1.0, 0.5], "init": ["text", "means", "random"]}, 1),
    "lws": ({"lr": [0.05, 0.3], "with_bias": [False, True], "momentum": [0.9, 0.0]}, 2),
    "tau_learned": ({"lr": [0.05, 0.3], "momentum": [0.9, 0.5], "weight_decay": [0.0, 1e-3]}, 1),
    "disalign": ({"lr": [0.02, 0.2], "exp_scale": [1.2, 0.5], "weight_decay": [0.0, 5e-4]}, 1),
    "marc": ({"lr": [0.03, 0.3], "exp_scale": [1.2, 0.5], "momentum": [0.9, 0.0]}, 1),
    "mlp2": ({"lr": [0.05, 0.3], "hidden": [0, 8]}, 2),
    "mlp3": ({"lr": [0.05, 0.3], "weight_decay": [0.0, 5e-3]}, 1),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cache = write_toy_cache(tmp_path_factory.mktemp("one_pass") / "cache", class_counts=(40, 15, 6, 3), feature_dim=6,
                            noise=1.2, text_head=True)
    lab = open_lab(cache)
    # a joint bias that is not zero, so that lws.with_bias changes what is trained
    joint = LinearHead(lab.data.joint.weight, torch.tensor([0.5, 0.0, -0.2, -0.4]))
    lab.data = replace(lab.data, joint=joint, _raw_logits={})
    return lab


def points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


@pytest.fixture
def passes(monkeypatch):
    """Each call of the one-pass trainer, as the number of heads it trained."""
    import ltcache.fitting

    calls: list[int] = []
    original = ltcache.fitting.train_together

    def spy(modules, *args, **kwargs):
        calls.append(len(modules))
        return original(modules, *args, **kwargs)

    monkeypatch.setattr(ltcache.fitting, "train_together", spy)
    return calls


def assert_same_fit(together, alone) -> None:
    tensors, expected = together.head.tensors(), alone.head.tensors()
    assert tensors.keys() == expected.keys()
    for key in tensors:
        torch.testing.assert_close(tensors[key], expected[key], rtol=1e-4, atol=2e-5, msg=key)
    assert together.chosen.keys() == alone.chosen.keys()
    for key, value in together.chosen.items():
        if isinstance(value, float):
            assert value == pytest.approx(alone.chosen[key], rel=1e-3, abs=2e-4), key
        else:
            assert value == alone.chosen[key], key


OWN_OPTIMIZER = {"tip_adapter_f", "lp_pp"}  # trained by their official optimizers (AdamW; full-batch steps), alone


def test_every_trained_method_has_a_plan_and_a_grid_here():
    trained = {name for name, entry in METHODS.items() if entry.stochastic} - OWN_OPTIMIZER
    assert trained == {name for name, entry in METHODS.items() if entry.plan is not None}
    assert trained == set(GRIDS)
    assert all(METHODS[name].stochastic and METHODS[name].plan is None for name in OWN_OPTIMIZER)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_one_pass_heads_equal_each_point_fitted_alone(lab, passes, name):
    grid, expected_passes = GRIDS[name]
    resolved = [resolve_params(name, {**TOY, **point}) for point in points(grid)]
    together = fit_points(name, [(lab.data, params) for params in resolved])
    heads_per_point = len(grid.get("max_norms", [[0]])[0])
    assert len(passes) == expected_passes and sum(passes) == len(resolved) * heads_per_point, passes
    passes.clear()
    for params, fitted in zip(resolved, together, strict=True):
        alone = lab.fit(name, **params)
        assert_same_fit(fitted, alone)
    assert sum(passes) == (len(resolved) * heads_per_point if heads_per_point > 1 else 0)  # alone: no shared pass
    distinct = {torch.cat([t.flatten().float() for t in fitted.head.tensors().values()]).sum().item()
                for fitted in together}
    assert len(distinct) == len(together)  # every point trained its own head


def test_mixed_groups_and_seeds_train_in_one_pass_each(lab, passes):
    """Points that differ in batch size or epochs train in separate passes; seeds are streams of one pass; each
    head still equals its point fitted alone with its seed."""
    runs = []
    for batch_size, epochs, seed, lr in itertools.product([8, 16], [2, 3], [0, 5], [0.05, 0.3]):
        params = resolve_params("crt", {"batch_size": batch_size, "epochs": epochs, "min_steps": 20, "lr": lr})
        runs.append((replace(lab.data, seed=seed), params))
    together = fit_points("crt", runs)
    assert sorted(passes) == [4, 4, 4, 4], passes  # 4 (batch, epochs) groups of 2 seeds x 2 lrs
    for (data, params), fitted in zip(runs, together, strict=True):
        from ltcache.stage2.core import run_fit

        assert_same_fit(fitted, run_fit("crt", data, params))
    seeds = {(run[0].seed, run[1]["lr"]): fitted.head.weight for run, fitted in zip(runs, together, strict=True)}
    assert not torch.allclose(seeds[0, 0.05], seeds[5, 0.05])  # another seed draws other batches


def test_uneven_streams_split_into_passes(lab, passes):
    """Two seeds with a different number of points each cannot be stacked as one rectangle: one pass per seed."""
    runs = [(replace(lab.data, seed=seed), resolve_params("lws", {**TOY, "lr": lr}))
            for seed, lr in [(0, 0.1), (0, 0.2), (1, 0.1)]]
    together = fit_points("lws", runs)
    assert passes == [3, 2, 1], passes  # the call for 3 heads splits into a pass of 2 (seed 0) and one of 1
    for (data, params), fitted in zip(runs, together, strict=True):
        from ltcache.stage2.core import run_fit

        assert_same_fit(fitted, run_fit("lws", data, params))
    passes.clear()
    rounded = [(replace(data, precision="bf16"), params) for data, params in runs]
    assert [fitted.chosen.get("precision") for fitted in fit_points("lws", rounded)] == ["bf16"] * 3
    assert passes == [3, 2, 1], passes  # the split passes keep the precision they were given


def test_compare_grids_and_seeds_use_one_pass_and_choose_as_before(lab, passes):
    """Lab.compare over a grid with --seeds: the grid is one pass, the replicates another, and the row is the one
    the point-by-point lab would give (the same choice, the same head)."""
    grid = {"crt": {**{k: str(v) for k, v in TOY.items()}, "lr": "0.02,0.1,0.4"}}
    comparison = lab.compare(["crt"], params=grid, bootstrap=0, seeds=3)
    assert passes == [3, 2], passes
    row = comparison.row("crt")
    chosen_lr = row.chosen["grid"]["lr"]
    alone = [lab.fit("crt", **{**TOY, "lr": lr}) for lr in (0.02, 0.1, 0.4)]
    scores = [lab.data.selection_score(fitted.head) for fitted in alone]
    assert chosen_lr == (0.02, 0.1, 0.4)[max(range(3), key=lambda i: (scores[i], -i))]
    assert [point.selection for point in row.grid] == pytest.approx(scores, abs=1e-9)
    assert row.seeds["n"] == 3 and len(row.seeds["mean_per_class"]["values"]) == 3


@pytest.mark.parametrize("name", ["crt", "crt_las", "cos", "mlp2"])
def test_bf16_one_pass_stays_near_each_point_alone_and_near_float32(lab, name):
    """With bf16 products (--precision bf16) the one pass and the point alone round differently, so they agree to
    bf16's precision, not float32's; and both stay near the float32 head."""
    grid, _ = GRIDS[name]
    resolved = [resolve_params(name, {**TOY, **point}) for point in points(grid)][:4]
    rounded = replace(lab.data, precision="bf16")
    together = fit_points(name, [(rounded, params) for params in resolved])
    for params, fitted in zip(resolved, together, strict=True):
        alone = fit_points(name, [(rounded, params)])[0]
        exact = lab.fit(name, **params)
        assert fitted.chosen["precision"] == alone.chosen["precision"] == "bf16" and "precision" not in exact.chosen
        for key, tensor in fitted.head.tensors().items():
            scale = float(exact.head.tensors()[key].abs().max())
            torch.testing.assert_close(tensor, alone.head.tensors()[key], rtol=0, atol=0.02 * scale, msg=key)
            torch.testing.assert_close(tensor, exact.head.tensors()[key], rtol=0, atol=0.05 * scale, msg=key)


def test_a_plugin_planned_method_trains_its_grid_in_one_pass(lab, passes):
    """The public API: a plugin's trained method written as a plan (ltcache.planned_method, Plan, lab_training)
    trains its grid in one pass, each point equal to the point alone."""
    import ltcache
    from ltcache.stage2.core import METHODS as REGISTRY

    @ltcache.planned_method("probe_plugin", *ltcache.TRAINING, summary="a linear probe, class-balanced",
                            card=ltcache.Card(paper="this test", code=None, reference_test=None))
    def probe(data: ltcache.LabData, **schedule) -> ltcache.Plan:
        torch.manual_seed(data.seed)
        linear = torch.nn.Linear(data.train.features.shape[1], data.num_classes)
        return ltcache.Plan([ltcache.lab_training(linear, data, **schedule)], lambda used: ltcache.Fitted(
            ltcache.LinearHead(linear.weight.detach().clone(), linear.bias.detach().clone()), used[0]))

    try:
        resolved = [resolve_params("probe_plugin", {**TOY, "lr": lr}) for lr in (0.05, 0.1, 0.3)]
        together = fit_points("probe_plugin", [(lab.data, params) for params in resolved])
        assert passes == [3]
        for params, fitted in zip(resolved, together, strict=True):
            assert_same_fit(fitted, lab.fit("probe_plugin", **params))
    finally:
        REGISTRY.entries.pop("probe_plugin", None)
