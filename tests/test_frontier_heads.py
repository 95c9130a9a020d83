"""The heads of issue 24 (kNN, Tip-Adapter, Tip-Adapter-F, LP++), each against an independent computation written
from its official code, and the pre-projection text head (extract --features both)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_reference import COUNTS, toy_data
from torch import nn

from ltcache.cache import Split
from ltcache.heads import CacheAdapterHead, KnnHead, LinearCosineHead, LinearHead, nearest_keys
from ltcache.stage2 import fit_method


def mean_per_class(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float(np.mean([(predictions[labels == c] == c).float().mean().item() for c in labels.unique()]))


# ------------------------------------------------------------------------------------------------------ kNN


def dinov2_knn(train, train_labels, queries, ks, temperature, num_classes):
    """dinov2/eval/knn.py's KnnModule.forward, written again: the full similarity matrix, the top max(ks), softmax
    of s / T over them, the one-hot votes of the first k summed."""
    train = F.normalize(train, dim=1)
    similarity = F.normalize(queries, dim=1) @ train.T
    top = similarity.topk(max(ks), dim=1, largest=True, sorted=True)
    weights = torch.softmax(top.values / temperature, 1)
    votes = F.one_hot(train_labels[top.indices], num_classes=num_classes) * weights[:, :, None]
    return {k: votes[:, :k, :].sum(1) for k in ks}


def test_knn_equals_dinov2s_vote():
    data = toy_data(seed=3)
    ks = [1, 3, 10, 20]
    fitted = fit_method("knn", data, {"ks": ks})
    expected = dinov2_knn(data.train.features, data.train.labels, data.val.features, ks, 0.07, len(COUNTS))
    scores = {k: mean_per_class(expected[k].argmax(1), data.val.labels) for k in ks}
    best = max(ks, key=lambda k: (scores[k], -ks.index(k)))
    assert fitted.chosen["k"] == best and fitted.chosen["selection_mean_per_class"] == pytest.approx(scores[best])
    assert [point["mean_per_class"] for point in fitted.curve] == pytest.approx([scores[k] for k in ks])
    queries = torch.cat([data.val.features, toy_data(seed=4).val.features])
    reference = dinov2_knn(data.train.features, data.train.labels, queries, [best], 0.07, len(COUNTS))[best]
    ours = fitted.head.logits(queries)
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    # the logits are the log of the normalized votes, a class without a vote at log(1e-30)
    normalized = reference / reference.sum(1, keepdim=True)
    assert torch.allclose(ours, normalized.clamp_min(1e-30).log(), atol=1e-4)


def test_nearest_keys_in_tiles_equals_the_whole_matrix_and_leaves_itself_out():
    generator = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(300, 5, generator=generator), dim=1)
    queries = F.normalize(torch.randn(70, 5, generator=generator), dim=1)
    whole = (queries @ keys.T).topk(12, dim=1)
    for tile in (1, 37, 5000, 1 << 22):  # one similarity per tile up to everything at once
        sims, index = nearest_keys(queries, keys, 12, tile=tile)
        assert torch.allclose(sims, whole.values, atol=1e-6) and torch.equal(index, whole.indices)
    sims, index = nearest_keys(keys[:50], keys, 3, tile=64, skip=torch.arange(50))
    assert not (index == torch.arange(50)[:, None]).any()  # leave-one-out: no row is its own neighbour
    masked = keys[:50] @ keys.T
    masked[torch.arange(50), torch.arange(50)] = -math.inf
    assert torch.equal(index, masked.topk(3, dim=1).indices)


def test_knn_selecting_on_train_leaves_each_row_out():
    data = toy_data(seed=3)
    on_train = replace(data, select="train")
    fitted = fit_method("knn", on_train, {"ks": [1, 2]})
    train = F.normalize(data.train.features, dim=1)
    similarity = train @ train.T
    similarity.fill_diagonal_(-math.inf)
    nearest = data.train.labels[similarity.argmax(1)]
    assert fitted.curve[0]["mean_per_class"] == pytest.approx(mean_per_class(nearest, data.train.labels))
    assert fitted.curve[0]["mean_per_class"] < 100.0  # itself would have been a perfect neighbour


def test_knn_refuses_a_fractional_k():
    from ltcache.core.errors import LtcacheError
    from ltcache.stage2.core import METHODS

    with pytest.raises(LtcacheError, match="whole numbers"):
        METHODS["knn"].check({"ks": [10, 2.5]}, COUNTS)


# ------------------------------------------------------------------------------------------------ Tip-Adapter


def official_tip_logits(features, keys, values, text_weights, alpha, beta):
    """main_imagenet.py / search_hp: clip_logits + cache_logits * alpha, cache_logits = exp(-(beta - beta * A)) @ L."""
    affinity = features @ keys.T
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
    return features @ text_weights.T + cache_logits * alpha


def official_search(features, labels, keys, values, text, betas, alphas):
    best, best_beta, best_alpha = -1.0, None, None
    for beta in betas:
        for alpha in alphas:
            score = mean_per_class(official_tip_logits(features, keys, values, text, alpha, beta).argmax(1), labels)
            if score > best:
                best, best_beta, best_alpha = score, beta, alpha
    return best_beta, best_alpha, best


def test_tip_adapter_equals_the_official_formula():
    data = toy_data(seed=8, text=True)
    grid = {"beta_scale": 7.0, "beta_steps": 20, "alpha_scale": 3.0, "alpha_steps": 6, "shots": 0}
    fitted = fit_method("tip_adapter", data, grid)
    keys = F.normalize(data.train.features, dim=1)
    values = F.one_hot(data.train.labels).float()
    val = F.normalize(data.val.features, dim=1)
    betas = [i * (7.0 - 0.1) / 20 + 0.1 for i in range(20)]
    alphas = [i * (3.0 - 0.1) / 6 + 0.1 for i in range(6)]
    beta, alpha, score = official_search(val, data.val.labels, keys, values, data.text.weight, betas, alphas)
    assert fitted.chosen["beta"] == pytest.approx(beta, abs=1e-4) and fitted.chosen["alpha"] == pytest.approx(alpha,
                                                                                                               abs=1e-4)
    assert fitted.chosen["selection_mean_per_class"] == pytest.approx(score)
    queries = F.normalize(toy_data(seed=9).val.features, dim=1)
    expected = official_tip_logits(queries, keys, values, data.text.weight, alpha, beta)
    assert torch.allclose(fitted.head.logits(queries), expected, atol=1e-4)


def test_tip_adapter_keys_average_the_train_views_and_shots_balance_the_cache():
    from ltcache.stage2.methods.neighbours import cache_keys

    data = toy_data(seed=8, text=True)
    generator = torch.Generator().manual_seed(1)
    second = data.train.features + 0.3 * torch.randn(data.train.features.shape, generator=generator)
    views = Split(torch.cat([data.train.features, second]), torch.cat([data.train.labels] * 2))
    with_views = replace(data, train_views=views)
    keys, labels = cache_keys(with_views, 0)
    expected = F.normalize(F.normalize(data.train.features, dim=1) + F.normalize(second, dim=1), dim=1)
    assert torch.allclose(keys, expected, atol=1e-6) and torch.equal(labels, data.train.labels)
    keys, labels = cache_keys(data, 4)
    assert torch.bincount(labels).tolist() == [min(4, n) for n in COUNTS]
    assert fit_method("tip_adapter", data, {"beta_steps": 2, "alpha_steps": 2}).chosen["keys"] == \
        sum(min(16, n) for n in COUNTS)  # the paper's 16 shots by default
    again, labels_again = cache_keys(data, 4)
    assert torch.equal(keys, again) and torch.equal(labels, labels_again)  # the seed draws the same subsample


def test_tip_adapter_f_equals_a_hand_written_adamw_loop():
    """run_tip_adapter_F on the cached rows: nn.Linear keys, AdamW eps 1e-4, CosineAnnealingLR per step, CE at
    init_beta 1 and init_alpha 1.17; the epoch best on val at those values kept; then the search."""
    data = toy_data(seed=8, text=True)
    settings = {"epochs": 4, "batch_size": 16, "lr": 0.01, "beta_steps": 10, "alpha_steps": 5, "shots": 0}
    fitted = fit_method("tip_adapter_f", data, settings)
    features, labels = F.normalize(data.train.features, dim=1), data.train.labels
    values = F.one_hot(labels).float()
    adapter = nn.Linear(features.shape[1], len(features), bias=False)
    adapter.weight = nn.Parameter(features.clone())
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=0.01, eps=1e-4)
    steps = math.ceil(len(features) / 16)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4 * steps)
    generator = torch.Generator().manual_seed(data.seed)
    val = F.normalize(data.val.features, dim=1)
    best, best_keys, best_epoch = -1.0, None, None
    for epoch in range(4):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), 16):
            batch = order[start : start + 16]
            affinity = adapter(features[batch])
            cache_logits = ((-1) * (1.0 - 1.0 * affinity)).exp() @ values
            loss = F.cross_entropy(features[batch] @ data.text.weight.T + cache_logits * 1.17, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            score = mean_per_class(official_tip_logits(val, adapter.weight, values, data.text.weight, 1.17,
                                                       1.0).argmax(1), data.val.labels)
        if score > best:
            best, best_keys, best_epoch = score, adapter.weight.detach().clone(), epoch + 1
    assert fitted.chosen["epoch_kept"] == best_epoch
    assert torch.allclose(fitted.head.keys, best_keys, atol=1e-5)
    assert (fitted.head.keys - features).abs().max() > 1e-3  # the keys moved
    betas = [i * (7.0 - 0.1) / 10 + 0.1 for i in range(10)]
    alphas = [i * (3.0 - 0.1) / 5 + 0.1 for i in range(5)]
    beta, alpha, _ = official_search(val, data.val.labels, best_keys, values, data.text.weight, betas, alphas)
    assert fitted.chosen["beta"] == pytest.approx(beta, abs=1e-4) and fitted.chosen["alpha"] == pytest.approx(alpha,
                                                                                                               abs=1e-4)


# ------------------------------------------------------------------------------------------------------ LP++


def official_lp_pp(features, labels, val_features, val_labels, text_weights, epochs, seed):
    """linear_probe_p2.LinearProbe_P2.forward written again with autograd: centroid sums, lr_w, alpha's init and lr,
    SGD momentum 0.9 on the linear layer, alpha stepped every 10 epochs with its never-zeroed gradient, the head of
    the last epoch with the best val score kept (>=)."""
    classes = text_weights.shape[1]
    torch.manual_seed(seed)
    one_hot = F.one_hot(labels, classes).float()
    classifier = nn.Linear(features.shape[1], classes, bias=True)
    classifier.weight.data = one_hot.T @ features  # compute_centroids: sums
    lr_w = 4 * features.shape[0] / max(np.linalg.eigh((features.T @ features).numpy().astype(np.float64))[0])
    similarity = features @ text_weights
    alpha_tilde = (one_hot * similarity / one_hot.sum(0, keepdim=True)).sum(0)
    alpha_vec = (250 * alpha_tilde.double().mean() * torch.ones(1, classes)).float().requires_grad_()
    lr_alpha = features.shape[0] / (torch.sum(similarity**2, dim=0).max() * 4)
    optimizer = torch.optim.SGD(classifier.parameters(), float(lr_w), momentum=0.9)
    best, kept = -1.0, None
    for epoch in range(epochs):
        logits = classifier(features) + torch.ones(features.shape[0], 1) @ alpha_vec * (features @ text_weights)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_alpha * alpha_vec.grad.data
        with torch.no_grad():
            val_logits = classifier(val_features) + alpha_vec * (val_features @ text_weights)
            score = mean_per_class(val_logits.argmax(1), val_labels)
            if score >= best:
                best = score
                kept = (classifier.weight.detach().clone(), classifier.bias.detach().clone(),
                        alpha_vec.detach().clone()[0], epoch + 1)
    return kept, best


def test_lp_pp_equals_the_official_loop():
    data = toy_data(seed=8, text=True)
    fitted = fit_method("lp_pp", data, {"epochs": 40})
    features, val = F.normalize(data.train.features, dim=1), F.normalize(data.val.features, dim=1)
    text = F.normalize(data.text.weight, dim=1).T
    (weight, bias, alpha, epoch), score = official_lp_pp(features, data.train.labels, val, data.val.labels, text, 40,
                                                         data.seed)
    assert fitted.chosen["epoch_kept"] == epoch and fitted.chosen["selection_mean_per_class"] == pytest.approx(score)
    queries = F.normalize(toy_data(seed=9).val.features, dim=1)
    expected = queries @ weight.T + bias + alpha * (queries @ text)
    assert torch.allclose(fitted.head.logits(toy_data(seed=9).val.features), expected, atol=2e-3, rtol=1e-4)
    assert fitted.chosen["alpha_min"] == pytest.approx(alpha.min().item(), abs=1e-3)


# ---------------------------------------------------------------------------- the pre-projection text head


def test_a_text_head_over_pre_projection_features_is_the_projected_head():
    """extract --features both stores f before CLIP's projection and the projection P: every text method then
    reads normalize(f @ P), which is what it reads on a cache of projected features."""
    data = toy_data(seed=8, text=True)
    generator = torch.Generator().manual_seed(2)
    wide = torch.randn(data.train.features.shape[1], 9, generator=generator)  # pre-projection = f @ pinv-ish lift
    projection = torch.linalg.pinv(wide)  # [9, 6]: (f @ wide) @ projection = f
    lifted = replace(data, train=Split(data.train.features @ wide, data.train.labels),
                     val=Split(data.val.features @ wide, data.val.labels),
                     joint=LinearHead(data.joint.weight @ projection.T, data.joint.bias),
                     text=replace(data.text, projection=projection), _raw_logits={})
    queries = toy_data(seed=9).val.features
    for name, settings in (("zero_shot", {}), ("tip_adapter", {"beta_steps": 10, "alpha_steps": 5, "shots": 0}),
                           ("lp_pp", {"epochs": 20}), ("gda", {}), ("zs_ensemble", {}), ("gla", {})):
        plain = fit_method(name, data, settings)
        projected = fit_method(name, lifted, settings)
        ours, expected = projected.head.logits(queries @ wide), plain.head.logits(queries)
        assert torch.allclose(ours, expected, atol=2e-3, rtol=1e-3), (name, (ours - expected).abs().max().item())
    assert isinstance(fit_method("zs_ensemble", lifted).head, LinearCosineHead)
    assert isinstance(fit_method("tip_adapter", lifted, {"beta_steps": 2, "alpha_steps": 2}).head, CacheAdapterHead)
    assert isinstance(fit_method("knn", lifted).head, KnnHead)


def test_cos_la_starts_from_the_text_head_mapped_back_through_the_projection():
    """LIFT's init_head_text_feat on pre-projection features: normalize(text @ proj^T)."""
    data = toy_data(seed=8, text=True)
    projection = torch.linalg.pinv(torch.randn(data.train.features.shape[1], 9,
                                               generator=torch.Generator().manual_seed(2)))  # [9, 6]
    lifted = replace(data, train=Split(torch.randn(64, 9), data.train.labels), text=replace(data.text,
                                                                                            projection=projection))
    fitted = fit_method("cos_la", lifted, {"lr": 1e-12, "epochs": 1, "min_steps": 1})
    expected = 25.0 * F.normalize(data.text.weight @ projection.T, dim=1)
    assert fitted.chosen["init"] == "text"
    assert torch.allclose(fitted.head.weight, expected, atol=1e-5)
