"""Heads that keep the train features: DINOv2's k-nearest-neighbour vote, and Tip-Adapter's cache model over CLIP's
zero-shot head (training-free, and -F with its keys fine-tuned).

Both compare every query with every train row, so the similarities are computed a tile at a time
(heads.nearest_keys, heads.cache_adapter_logits): never a selection x train or test x train matrix whole. The tile
follows --memory-budget. Each method's card names the official code and every deviation from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ltcache.core.errors import LtcacheError
from ltcache.core.params import GRID, Param
from ltcache.stage2.cards import Card, Deviation
from ltcache.stage2.core import Fitted, LabData, method

if TYPE_CHECKING:
    import torch

KNN_KS = (10.0, 20.0, 100.0, 200.0)  # dinov2/eval/knn.py: --nb_knn 10 20 100 200
KNN_TEMPERATURE = 0.07


def similarity_tile(data: LabData) -> int:
    """Similarities computed at a time: a sixteenth of the memory budget, from 2^20 to 2^26 floats."""
    return int(min(1 << 26, max(1 << 20, data.budget // 64)))


def check_knn(params: dict, class_counts) -> None:
    bad = [k for k in params["ks"] if float(k) != int(k)]
    if bad:
        raise LtcacheError(f"knn.ks must be whole numbers of neighbours, got {bad[0]}; e.g. --set knn.ks=10,20,100")


KNN_CARD = Card(
    paper="Oquab, Darcet, Moutakanni et al., TMLR 2024 (DINOv2; the protocol of Wu et al., CVPR 2018)",
    title="DINOv2: Learning Robust Visual Features without Supervision",
    code="facebookresearch/dinov2: dinov2/eval/knn.py (KnnModule)",
    matches=("Cosine similarity of the L2-normalized query to every L2-normalized train feature; the k most similar "
             "vote with weights softmax(s / T), T = 0.07, summed per class (the class scores are those votes).",
             "k from 10, 20, 100 and 200, DINOv2's --nb_knn list."),
    deviations=(Deviation("k is chosen on the selection split by mean per-class accuracy, and test is scored once "
                          "with it.",
                          "DINOv2's script reports test accuracy for every k; picking the best of those is a choice "
                          "made on test."),
                Deviation("The logits are log(votes), a class without a vote at log(1e-30).",
                          "The argmax is DINOv2's; the log gives finite logits that the calibration and top-5 "
                          "metrics read like any other head's."),
                Deviation("With --select train each train row leaves itself out of its neighbours.",
                          "Otherwise every train row would find itself first and every k would look perfect."),
                Deviation("The keys are the train features (one view each; the augmented train views are not keys).",
                          "DINOv2's kNN uses the un-augmented train set.")),
    features="Any frozen features; DINOv2 reports it on its CLS token (extract --features cls or cls_patch for the "
             "linear protocol's feature).",
    reference_test="tests/test_frontier_heads.py::test_knn_equals_dinov2s_vote")


@method("knn",
        Param("ks", GRID, KNN_KS, "Neighbour counts k, the one with the best mean per-class accuracy on the selection "
              "split kept (DINOv2's 10, 20, 100, 200).", low=1, high=100_000, max_points=100),
        Param("temperature", float, KNN_TEMPERATURE, "T of the vote weights softmax(s / T).", above=0, high=100),
        summary="k-nearest-neighbour vote over cosine similarity to every train feature (DINOv2's protocol), k chosen "
        "on the selection split, similarities in tiles under the memory budget", check=check_knn, card=KNN_CARD)
def fit_knn(data: LabData, *, ks, temperature: float) -> Fitted:
    """One top-max(ks) search of the selection rows over the train keys serves every k."""
    import torch
    import torch.nn.functional as F

    from ltcache.heads import KnnHead, knn_log_votes, nearest_keys
    from ltcache.logits import as_float32

    train, selection = data.train, data.selection
    keys = F.normalize(as_float32(train.features), dim=1)
    skip = torch.arange(len(selection.labels), device=keys.device) if data.select == "train" else None
    ks = [int(k) for k in ks]
    sims, index = nearest_keys(F.normalize(as_float32(selection.features), dim=1), keys, max(ks),
                               tile=similarity_tile(data), skip=skip)
    neighbour_labels = train.labels[index]
    curve, best = [], None
    for k in ks:
        predictions = knn_log_votes(sims[:, :k], neighbour_labels[:, :k], data.num_classes, temperature).argmax(1)
        score = data.score(predictions, data.select)["mean_per_class"]
        curve.append({"k": k, "mean_per_class": score})
        if best is None or score > best[0]:
            best = (score, k)
    score, k = best
    head = KnnHead(keys, train.labels, data.num_classes, min(k, len(keys)), temperature)
    chosen = {"k": k, "temperature": temperature, "keys": len(keys)}
    if len(ks) > 1:
        chosen.update(selected_on=data.selected_on, selection_mean_per_class=round(score, 4))
    return Fitted(head, chosen, curve if len(ks) > 1 else None)


# ------------------------------------------------------------------------------------------------- Tip-Adapter

TIP_BETA_SCALE, TIP_ALPHA_SCALE, TIP_BETA_STEPS, TIP_ALPHA_STEPS = 7.0, 3.0, 200, 20  # configs/imagenet.yaml
TIP_INIT_BETA, TIP_INIT_ALPHA = 1.0, 1.17
TIP_LR, TIP_EPOCHS, TIP_BATCH = 0.001, 20, 256
TIP_SHOTS = 16  # the paper's largest few-shot cache


def search_grid(scale: float, steps: int) -> list[float]:
    """The official search list: steps values from 0.1, i * (scale - 0.1) / steps + 0.1 (search_hp)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def text_space(data: LabData, features: torch.Tensor) -> torch.Tensor:
    """Features in the zero-shot head's space, L2-normalized: f @ projection for a cache of pre-projection features
    (extract --features both), else f."""
    import torch.nn.functional as F

    from ltcache.heads import project
    from ltcache.logits import as_float32

    projection = None if data.text is None else data.text.projection
    return F.normalize(project(as_float32(features), None if projection is None else projection.to(features.device)),
                       dim=1)


def cache_keys(data: LabData, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [M, d], labels [M]): the train images' features in the text space, each the mean over its augmented
    views when the cache has them (the official augment_epoch), normalized; with shots > 0 at most `shots` per class,
    drawn with the lab's seed."""
    import torch
    import torch.nn.functional as F

    count = len(data.train)
    keys = text_space(data, data.train.features)
    if data.train_views is not None:
        views = data.train_views.features
        total = torch.zeros_like(keys)
        for view in range(data.views):
            total += text_space(data, views[view * count : (view + 1) * count])
        keys = F.normalize(total, dim=1)  # build_cache_model: the views' mean, normalized
    labels = data.train.labels
    if shots > 0:  # the first `shots` rows of each class in a seeded order
        order = torch.randperm(count, generator=torch.Generator().manual_seed(data.seed)).to(labels.device)
        by_class = order[torch.sort(labels[order], stable=True).indices]  # class by class, seeded order inside
        sorted_labels = labels[by_class]
        first = torch.searchsorted(sorted_labels, sorted_labels)  # where each row's class starts
        keep = by_class[torch.arange(count, device=labels.device) - first < shots].sort().values
        keys, labels = keys[keep], labels[keep]
    return keys.contiguous(), labels.contiguous()


def search_alpha_beta(data: LabData, text_logits_of, keys: torch.Tensor, key_labels: torch.Tensor, betas,
                      alphas) -> tuple[float, float, float, list[dict]]:
    """(alpha, beta, score, curve): every (beta, alpha) of the grid scored on the selection split by mean per-class
    accuracy, a block of selection rows at a time (each beta's cache logits computed once per block). Ties: the first
    point, betas outer, as the official loops."""
    import torch

    from ltcache.heads import cache_adapter_logits

    selection = data.selection
    classes = data.num_classes
    hits = torch.zeros(len(betas), len(alphas), classes, dtype=torch.float64)
    block = 4096
    for start in range(0, len(selection.labels), block):
        rows = slice(start, start + block)
        queries = text_space(data, selection.features[rows])
        labels = selection.labels[rows]
        text = text_logits_of(queries)
        for b, beta in enumerate(betas):
            cache = cache_adapter_logits(queries, keys, key_labels, classes, beta, tile=similarity_tile(data))
            for a, alpha in enumerate(alphas):
                correct = (text + alpha * cache).argmax(1) == labels
                hits[b, a] += torch.bincount(labels[correct], minlength=classes).double().cpu()
    counts = torch.bincount(selection.labels, minlength=classes).double().cpu()
    present = counts > 0
    scores = 100.0 * (hits[..., present] / counts[present]).mean(-1)
    curve = [{"beta": round(beta, 4), "alpha": round(alpha, 4), "mean_per_class": float(scores[b, a])}
             for b, beta in enumerate(betas) for a, alpha in enumerate(alphas)]
    flat = int(torch.argmax(scores.reshape(-1)))  # the first maximum
    b, a = divmod(flat, len(alphas))
    return float(alphas[a]), float(betas[b]), float(scores[b, a]), curve


TIP_PARAMS = (
    Param("shots", int, TIP_SHOTS, "Keys per class: at most N train images of each class, drawn with the seed (the "
          "paper's 16-shot cache, class-balanced up to the tail's own counts); 0 keeps every train image (a "
          "long-tailed cache, whose votes favour the head classes).", low=0, high=10**6),
    Param("beta_scale", float, TIP_BETA_SCALE, "Largest beta searched (the official search_scale[0]).", above=0.1,
          high=1000),
    Param("alpha_scale", float, TIP_ALPHA_SCALE, "Largest alpha searched (search_scale[1]).", above=0.1, high=1000),
    Param("beta_steps", int, TIP_BETA_STEPS, "betas searched, from 0.1 (search_step[0]).", low=1, high=1000),
    Param("alpha_steps", int, TIP_ALPHA_STEPS, "alphas searched, from 0.1 (search_step[1]).", low=1, high=1000),
)
TIP_CODE = "gaopengcuhk/Tip-Adapter: main_imagenet.py (run_tip_adapter, run_tip_adapter_F), utils.py " \
           "(build_cache_model, search_hp), configs/imagenet.yaml"
TIP_PAPER = "Zhang, Fang, Zhang, Ma, Gao, Dai, Qiao & Li, ECCV 2022"
TIP_TITLE = "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification"
TIP_DEVIATIONS = (
    Deviation("alpha and beta are searched on the selection split by mean per-class accuracy.",
              "The official ImageNet script searches them on test (search_hp over test_features); its other "
              "datasets search on val by accuracy."),
    Deviation("The cache is at most 16 train images per class (shots=16), drawn with the seed; a class with fewer "
              "gives all of its images. shots=0 keeps every train image.",
              "The paper's cache is the whole few-shot train set, balanced by construction. A long-tailed train set "
              "as the cache makes the summed votes grow with the class counts: on a tiny CLIP fashion-mnist-lt "
              "test the all-images cache predicted the head class for every image. The similarities are computed "
              "in tiles either way, so a large cache costs time, not memory."),
    Deviation("The zero-shot logits use the model's own logit scale (100 for pretrained CLIP).",
              "The official code writes 100 x f @ W_text; the cache's text head carries CLIP's learned scale, which is "
              "100 for every released CLIP and differs only for random test towers."),
)
TIP_CARD = Card(
    paper=TIP_PAPER, title=TIP_TITLE, code=TIP_CODE,
    matches=("logits = zero-shot + alpha exp(-beta (1 - f k^T)) L, f and the keys L2-normalized CLIP image features, "
             "L the keys' one-hot labels.",
             "The keys are the mean of each train image's augmented views, normalized (extract --train-views K as "
             "augment_epoch).",
             "The search grid of configs/imagenet.yaml: 200 betas from 0.1 to 7 and 20 alphas from 0.1 to 3."),
    deviations=TIP_DEVIATIONS,
    features="CLIP's projected image embedding, which the text head needs (extract --zero-shot; with --features "
             "both the pre-projection features are projected first).",
    reference_test="tests/test_frontier_heads.py::test_tip_adapter_equals_the_official_formula")


@method("tip_adapter", *TIP_PARAMS, summary="Tip-Adapter (Zhang et al. ECCV 2022): CLIP's zero-shot logits plus a "
        "training-free cache model over the train features, alpha and beta searched on the selection split",
        text=True, card=TIP_CARD)
def fit_tip_adapter(data: LabData, *, shots: int, beta_scale: float, alpha_scale: float, beta_steps: int,
                    alpha_steps: int) -> Fitted:
    keys, key_labels = cache_keys(data, shots)
    return searched_adapter(data, keys, key_labels, betas=search_grid(beta_scale, beta_steps),
                            alphas=search_grid(alpha_scale, alpha_steps), shots=shots)


def searched_adapter(data: LabData, keys: torch.Tensor, key_labels: torch.Tensor, *, betas, alphas,
                     **chosen) -> Fitted:
    """The cache model over `keys` with alpha and beta searched on the selection split (search_alpha_beta), as a
    Fitted recording them, the key count, `chosen` and the selection curve."""
    from ltcache.heads import CacheAdapterHead

    text = data.text.weight.to(keys.device)
    alpha, beta, score, curve = search_alpha_beta(data, lambda queries: queries @ text.T, keys, key_labels, betas,
                                                  alphas)
    head = CacheAdapterHead(text, keys, key_labels, alpha, beta, data.text.projection)
    return Fitted(head, {"alpha": round(alpha, 4), "beta": round(beta, 4), "keys": len(keys), **chosen,
                         "selected_on": data.selected_on, "selection_mean_per_class": round(score, 4)}, curve)


TIP_F_CARD = Card(
    paper=TIP_PAPER, title=TIP_TITLE, code=TIP_CODE,
    matches=("Tip-Adapter's cache with its keys as a learnable linear layer (initialized to the keys), trained with "
             "cross-entropy of the Tip-Adapter logits at init_beta 1 and init_alpha 1.17.",
             "AdamW, lr 0.001, eps 1e-4, no weight decay beyond AdamW's default, 20 epochs of shuffled batches of 256, "
             "cosine lr to 0 per step; then alpha and beta searched for the trained keys."),
    deviations=(Deviation("The epoch kept is the one with the best mean per-class accuracy on the selection split at "
                          "the initial alpha and beta.",
                          "The official ImageNet script keeps the epoch that is best on test."),
                Deviation("The batches are shuffled rows of the cached features (one of the augmented views per "
                          "image and epoch with extract --train-views), not freshly augmented images.",
                          "Stage 2 never touches images."),
                *TIP_DEVIATIONS),
    features=TIP_CARD.features,
    reference_test="tests/test_frontier_heads.py::test_tip_adapter_f_equals_a_hand_written_adamw_loop")


@method("tip_adapter_f", *TIP_PARAMS,
        Param("epochs", int, TIP_EPOCHS, "Training epochs (each len(train) rows).", low=1, high=100_000),
        Param("batch_size", int, TIP_BATCH, "Rows per step.", low=1, high=2**24),
        Param("lr", float, TIP_LR, "Peak AdamW lr, cosine to 0.", above=0, high=10),
        summary="Tip-Adapter-F (Zhang et al. ECCV 2022): the cache model's keys fine-tuned with AdamW, the epoch and "
        "then alpha and beta chosen on the selection split", text=True, stochastic=True, card=TIP_F_CARD)
def fit_tip_adapter_f(data: LabData, *, shots: int, beta_scale: float, alpha_scale: float, beta_steps: int,
                      alpha_steps: int, epochs: int, batch_size: int, lr: float) -> Fitted:
    keys, key_labels = cache_keys(data, shots)
    trained, epoch = train_cache_keys(data, keys, key_labels, epochs=epochs, batch_size=batch_size, lr=lr)
    return searched_adapter(data, trained, key_labels, betas=search_grid(beta_scale, beta_steps),
                            alphas=search_grid(alpha_scale, alpha_steps), shots=shots, epochs=epochs,
                            epoch_kept=epoch, batch_size=batch_size, lr=lr, optimizer="adamw")


def train_cache_keys(data: LabData, keys: torch.Tensor, key_labels: torch.Tensor, *, epochs: int, batch_size: int,
                     lr: float) -> tuple[torch.Tensor, int]:
    """run_tip_adapter_F's loop on cached rows: the keys trained by AdamW (eps 1e-4) on CE of the Tip-Adapter logits
    at the initial alpha and beta, cosine lr per step; the keys of the epoch best on the selection split (ties: the
    earliest) and that epoch (1-based)."""
    import torch
    import torch.nn.functional as F

    from ltcache.core.runtime import cosine_factor
    from ltcache.heads import CacheAdapterHead

    fitting = data.split(data.fitting)
    text = data.text.weight.to(keys.device)
    weight = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([weight], lr=lr, eps=1e-4)
    generator = torch.Generator().manual_seed(data.seed)
    rows_per_epoch = len(data.train)
    steps = -(-rows_per_epoch // batch_size)
    total, step = epochs * steps, 0
    best = None
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(fitting.labels), generator=generator)[:rows_per_epoch].to(keys.device)
        for start in range(0, rows_per_epoch, batch_size):
            batch = order[start : start + batch_size]
            features = text_space(data, fitting.features[batch])
            affinity = features @ weight.T
            cache = torch.zeros(len(batch), data.num_classes, device=keys.device).index_add(
                1, key_labels, ((-1) * (TIP_INIT_BETA - TIP_INIT_BETA * affinity)).exp())
            logits = features @ text.T + TIP_INIT_ALPHA * cache
            loss = F.cross_entropy(logits, fitting.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_factor(step, total)
        with torch.no_grad():
            head = CacheAdapterHead(text, weight.detach(), key_labels, TIP_INIT_ALPHA, TIP_INIT_BETA,
                                    data.text.projection)
            score = data.selection_score(head)
        if best is None or score > best[0]:
            best = (score, weight.detach().clone(), epoch)
    return best[1], best[2]
