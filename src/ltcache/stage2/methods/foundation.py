"""Heads from the recent long-tail work on frozen (foundation-model) features.

Without a text tower:
- `gda`: Gaussian discriminant analysis, a training-free baseline that is hard to beat on frozen features (Wang et
  al., ICLR 2024, "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation"); with CLIP's text head it is
  the official zero-shot + alpha * GDA ensemble;
- `cos_la`: a cosine classifier trained with the logit-adjusted loss, LIFT's classifier (Shi et al., ICML 2024,
  "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts"), here on cached features.

With CLIP's zero-shot text head (extract --zero-shot; LabData.text, logits = W_text @ normalize(f)):
- `zero_shot`: the text head as it is (Radford et al., ICML 2021);
- `zs_ensemble`: (1 - a) joint + a zero-shot logits, a chosen on the selection split (output-space ensembling, the
  "naive ensemble" that GLA improves on);
- `gla`: generalized logit adjustment (Zhu et al., NeurIPS 2023, "Generalized Logit Adjustment: Calibrating
  Fine-tuned Models by Removing Label Bias in Foundation Models"), the official recipe: both heads calibrated by
  confidence matching, the zero-shot head's label bias q estimated on a balanced split, then
  joint / T_joint - log(train prior) + zero-shot / T_zs - log q.

Each method's card (stage2/cards.py) names the official code and every deviation from it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ltcache.core.errors import LtcacheError
from ltcache.core.params import GRID, Param
from ltcache.heads import LOGIT_CHUNK_ROWS, LinearCosineHead, LinearHead
from ltcache.stage2.cards import Card, Deviation
from ltcache.stage2.core import Fitted, LabData, method, with_defaults
from ltcache.stage2.training import TRAINER_DEVIATIONS, TRAINING, Plan, lab_training, planned_method

if TYPE_CHECKING:
    import torch

SHRINKAGES = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4, 0.7)
GDA_ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # the official grid of the GDA logits' weight
SINGULAR = 1e-10  # smallest / largest eigenvalue of the shrunk covariance below which it counts as singular


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int, transform=None):
    """(class means [C, d], pooled within-class covariance [d, d]) of transform(f) in float64, a chunk of rows at a
    time: S = (sum_i f_i f_i^T - sum_k n_k mu_k mu_k^T) / N, the covariance of each row about its class mean."""
    import torch

    dim = (features[:1] if transform is None else transform(features[:1])).shape[1]  # a transform may project
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=features.device)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=features.device)
    for chunk, chunk_labels in zip(features.split(LOGIT_CHUNK_ROWS), labels.split(LOGIT_CHUNK_ROWS), strict=True):
        chunk = (chunk if transform is None else transform(chunk)).double()
        sums.index_add_(0, chunk_labels, chunk)
        gram.addmm_(chunk.T, chunk)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    means = sums / counts.clamp_min(1)[:, None]
    covariance = (gram - (means * counts[:, None]).T @ means) / max(1, len(labels))
    return means, covariance


def gda_head(means: torch.Tensor, covariance: torch.Tensor, shrinkage: float, eigen=None,
             scale: float = 1.0) -> LinearHead | None:
    """The LDA head for a uniform class prior, times `scale`: Sigma = (1 - a) S + a tr(S)/d I, w_k = Sigma^-1 mu_k,
    b_k = -mu_k^T Sigma^-1 mu_k / 2 (argmax_k of the Gaussian log-likelihood with one shared covariance).

    Sigma^-1 comes from one eigendecomposition of S (pass `eigen` = torch.linalg.eigh(S) to reuse it across a
    grid), so a singular or nearly singular Sigma is seen (None) instead of solved into huge weights."""
    import torch

    values, vectors = eigen if eigen is not None else torch.linalg.eigh(covariance)
    dim = covariance.shape[0]
    shrunk = (1 - shrinkage) * values.clamp_min(0) + shrinkage * covariance.trace() / dim
    if shrunk.min() <= SINGULAR * shrunk.max():
        return None
    projected = means @ vectors  # [C, d] in the eigenbasis
    weight = (projected / shrunk) @ vectors.T
    bias = -0.5 * (weight * means).sum(1)
    return LinearHead((scale * weight).float(), (scale * bias).float())


def official_gda_shrinkage(rows: int, dim: int) -> tuple[float, float]:
    """The official estimator (mrflogs/ICLR24, main_few_shots.py) as (shrinkage a, scale c) of gda_head: its
    precision d * pinv((N - 1) C + tr(C) I), C = N S / (N - 1) the covariance of the class-centred rows (torch.cov),
    is c * Sigma^-1 with Sigma = (1 - a) S + a tr(S)/d I, a = d / (N - 1 + d) and c = d (N - 1) / (N (N - 1 + d))."""
    rows = max(rows, 2)
    return dim / (rows - 1 + dim), dim * (rows - 1) / (rows * (rows - 1 + dim))


GDA_CARD = Card(
    paper="Wang, Liang, Sheng, He, Wang & Tan, ICLR 2024",
    title="A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation",
    code="mrflogs/ICLR24: main_few_shots.py (run)",
    matches=("L2-normalized features, class means and the covariance of the class-centred rows (normalize=true).",
             "The closed-form shrinkage: precision d * pinv((N - 1) C + tr(C) I), with C the class-centred rows' "
             "covariance over N rows (shrinkage=closed_form), a uniform prior.",
             "With CLIP's text head: logits = zero-shot + alpha * GDA, alpha chosen on val from 1e-4, 1e-3, 0.01, "
             "0.1, 1, 10, 100 (the first best wins).",
             "compare --train-views: the means and covariance over the augmented train views, as the official "
             "`augment_epoch` passes over the training images."),
    deviations=(Deviation("The precision comes from one eigendecomposition, not a pseudo-inverse, and a singular "
                          "shrunk covariance is refused.",
                          "With tr(C) > 0 the shrunk covariance is positive definite and both give the same matrix; "
                          "a singular one (shrinkage=grid at 0) would otherwise be silently pseudo-inverted."),
                Deviation("The uniform prior's constant log(1/C) is left out of the bias.",
                          "It is the same for every class, so no logit difference changes."),
                Deviation("Without a text head (or zero_shot=false), GDA alone.",
                          "The official method always has CLIP's text head; on other frozen features the GDA head "
                          "is the whole classifier."),
                Deviation("alpha is chosen by mean per-class accuracy on the selection split (the official code: "
                          "overall accuracy on val).",
                          "Every ltcache choice uses mean per-class accuracy; on a balanced val split they are "
                          "equal."),
                Deviation("Options beyond the official method: normalize=false (raw features) and shrinkage=grid "
                          "(the shrinkage chosen among `shrinkages` on the selection split; then it equals "
                          "scikit-learn's LDA with its log prior removed).",
                          "ltcache's earlier form, kept for comparison.")),
    features="Any frozen features; the paper's are CLIP's projected image embedding, which the text head needs.",
    reference_test="tests/test_foundation_heads.py::test_gda_equals_the_official_computation")


@method("gda",
        Param("normalize", bool, True, "L2-normalize the features first (the official method)."),
        Param("shrinkage", str, "closed_form", "closed_form: the official covariance shrinkage d / (N - 1 + d); "
              "grid: choose among `shrinkages` on the selection split.", choices=("closed_form", "grid")),
        Param("shrinkages", GRID, SHRINKAGES, "Shrinkage of the shared covariance toward tr(S)/d I, chosen on the "
              "selection split (shrinkage=grid).", low=0, high=1, max_points=100),
        Param("zero_shot", bool, True, "With CLIP's text head in the cache: zero-shot + alpha * GDA logits (the "
              "official method); false: GDA alone."),
        Param("alphas", GRID, GDA_ALPHAS, "Weight alpha of the GDA logits beside the zero-shot ones, chosen on the "
              "selection split.", above=0, max_points=100),
        summary="Gaussian discriminant analysis (Wang et al. ICLR 2024): L2-normalized features, class means and one "
        "shared covariance with the closed-form shrinkage, training-free; zero-shot + alpha * GDA when the cache has "
        "CLIP's text head", card=GDA_CARD)
def fit_gda(data: LabData, *, normalize: bool, shrinkage: str, shrinkages, zero_shot: bool, alphas) -> Fitted:
    """Class means and the pooled within-class covariance of the (normalized) train features; the official shrinkage
    or each of a grid; with the text head each alpha of the ensemble. The best on the selection split is kept (ties:
    the first point in grid order)."""
    import torch
    import torch.nn.functional as F

    split = data.split(data.fitting)
    text = data.text if zero_shot and data.text is not None else None
    projection = None if text is None or text.projection is None else text.projection.to(split.features.device)
    if projection is not None:  # pre-projection features (--features both): GDA in the text head's space
        transform = (lambda chunk: F.normalize(chunk.float() @ projection, dim=1)) if normalize else \
            (lambda chunk: chunk.float() @ projection)
    else:
        transform = (lambda chunk: F.normalize(chunk.float(), dim=1)) if normalize else None
    means, covariance = class_statistics(split.features, split.labels, data.num_classes, transform)
    eigen = torch.linalg.eigh(covariance)
    if shrinkage == "closed_form":
        official, scale = official_gda_shrinkage(len(split.labels), covariance.shape[0])
        candidates = [(official, scale)]
    else:
        candidates = [(float(a), 1.0) for a in shrinkages]
    curve, best = [], None
    for amount, scale in candidates:
        gda = gda_head(means, covariance, amount, eigen, scale)
        for alpha in (alphas if text is not None else (None,)):
            point = {"shrinkage": round(amount, 6)} | ({"alpha": float(alpha)} if alpha is not None else {})
            if gda is None:  # singular (e.g. shrinkage 0 with fewer train rows than dimensions)
                curve.append({**point, "mean_per_class": float("nan")})
                continue
            head = _gda_with_text(gda, text, float(alpha), normalize) if text is not None else \
                replace(gda, normalize_input=normalize, projection=projection)
            score = data.selection_score(head)
            curve.append({**point, "mean_per_class": score})
            if best is None or score > best[0]:
                best = (score, point, head)
    if best is None:
        raise LtcacheError("gda: the covariance is singular at every shrinkage; add a shrinkage above 0, e.g. "
                           "--set gda.shrinkages=0.1,0.5")
    score, point, head = best
    chosen = {"normalize": normalize, "shrinkage_rule": shrinkage, **point, "zero_shot": text is not None}
    if len(curve) > 1:
        chosen.update(selected_on=data.selected_on, selection_mean_per_class=round(score, 4))
    return Fitted(head, chosen, curve if len(curve) > 1 else None)


def _gda_with_text(gda: LinearHead, text: LinearHead, alpha: float, normalize: bool):
    """zero-shot + alpha * GDA logits: one linear head on normalized features, or a head on the features plus the
    text head on their normalized copy."""
    if normalize:
        return LinearHead(text.weight.to(gda.weight.device) + alpha * gda.weight, alpha * gda.bias,
                          normalize_input=True, projection=text.projection)
    if text.projection is not None:  # GDA over the projected features, unnormalized
        weight = text.projection.to(gda.weight.device) @ (alpha * gda.weight).T
        return LinearCosineHead(weight.T.contiguous(), text.weight.to(gda.weight.device), alpha * gda.bias,
                                text.projection)
    return LinearCosineHead(alpha * gda.weight, text.weight.to(gda.weight.device), alpha * gda.bias)


LIFT_LR, LIFT_BATCH = 0.01, 128  # configs/model/clip_vit_b16_peft.yaml: lr 0.01 at batch 128
LIFT_TRAINING = tuple(
    replace(param, help="Peak lr, cosine to 0 (default LIFT's 0.01 x batch / 128).",
            default_text="0.01 x batch_size / 128") if param.name == "lr" else param
    for param in with_defaults(TRAINING, batch_size=LIFT_BATCH))
COS_LA_CARD = Card(
    paper="Shi, Wei, Zhou, Shao, Han & Li, ICML 2024",
    title="Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts",
    code="shijxcs/LIFT: models/classifiers.py (CosineClassifier), utils/losses.py (LogitAdjustedLoss), trainer.py "
         "(init_head_text_feat, init_head_class_mean, build_optimizer), configs/model/clip_vit_b16_peft.yaml",
    matches=("A cosine classifier s * cos(f, w_j) with the fixed scale 25.",
             "The logit-adjusted loss CE(z + tau log prior), tau 1, on instance-sampled batches.",
             "SGD, momentum 0.9, weight decay 5e-4, 10 epochs, lr 0.01 at batch 128 (scaled linearly with the "
             "batch).",
             "init=auto starts from CLIP's text features when the cache has the text head (LIFT's init_head "
             "text_feat), else from the normalized class means (LIFT's class_mean).",
             "On a cache of pre-projection features (extract --features both, LIFT's 768-d input for ViT-B/16) "
             "init=text maps the text features back through proj^T and normalizes them, as init_head_text_feat.",
             "Test-time ensembling is compare --tta on a cache with extract --test-crops 5: LIFT's fivecrop of the "
             "image resized to 224 + 24, the crops' logits averaged (trainer.test)."),
    deviations=(Deviation("Only the head is trained, on frozen cached features.",
                          "LIFT also trains AdaptFormer modules inside the image tower; stage 2 never changes the "
                          "features, so this is LIFT's classifier, not its fine-tuning."),
                Deviation("On a cache of projected features (extract --zero-shot alone) the head sits on the "
                          "512-d projected embedding and init=text uses the text embeddings as they are.",
                          "LIFT's head sits on the pre-projection features; extract --features both --zero-shot "
                          "gives those, and then init=text is LIFT's."),
                Deviation("The lr follows a cosine to 0 per step.",
                          "LIFT steps CosineAnnealingLR once per epoch; ltcache uses one schedule for every trained "
                          "head."),
                *TRAINER_DEVIATIONS[2:]),
    features="LIFT's head reads CLIP ViT-B/16's 768-d pre-projection image features: extract --backbone "
             "open_clip:ViT-B-16/openai --pretrained --features both --zero-shot --test-crops 5.",
    reference_test="tests/test_reference.py::test_trained_head_equals_hand_written_sgd[cos_la]")


@planned_method("cos_la", *LIFT_TRAINING,
                Param("scale", float, 25.0, "Fixed scale s of the cosine logits (LIFT's 25).", above=0, high=1000),
                Param("tau", float, 1.0, "Logit adjustment of the loss: CE(s cos + tau log prior).", low=0, high=10),
                Param("init", str, "auto", "Initial class weights: auto (the text head when the cache has one, as "
                      "LIFT, else the train class means), text, means, or random.",
                      choices=("auto", "text", "means", "random")),
                summary="cosine classifier with a fixed scale trained by the logit-adjusted loss on instance-sampled "
                "batches, LIFT's classifier (Shi et al. ICML 2024); initialized from CLIP's text head when the cache "
                "has one, else from the class means", card=COS_LA_CARD)
def fit_cos_la(data: LabData, *, scale: float, tau: float, init: str, lr: float | None, batch_size: int,
               **hyperparameters) -> Plan:
    """The loss adds tau log(prior) to the logits during training only, so the trained cosine logits aim at a
    balanced test set as they are (no post-hoc shift)."""
    import torch
    import torch.nn.functional as F

    from ltcache.stage2.methods.ncm import class_means
    from ltcache.stage2.modules import BalancedSoftmax, CosineClassifier

    torch.manual_seed(data.seed)
    split = data.split(data.fitting)
    device = split.features.device
    if init == "auto":
        init = "text" if data.text is not None else "means"
    initial = None
    if init == "text":
        if data.text is None:
            raise LtcacheError("cos_la.init=text needs CLIP's zero-shot text head; extract with --backbone "
                               "open_clip:ARCH/TAG --zero-shot, or use init=means")
        text = data.text.weight.to(device)
        if data.text.projection is not None:  # LIFT's init_head_text_feat: text features mapped back through proj^T
            text = text @ data.text.projection.to(device).T
        initial = F.normalize(text, dim=1)
    elif init == "means":
        initial = F.normalize(class_means(split.features, split.labels, data.num_classes,
                                          lambda chunk: F.normalize(chunk, dim=1)), dim=1)
    module = CosineClassifier(split.features.shape[1], data.num_classes, scale, device, learn_scale=False,
                              weight=initial)
    criterion = BalancedSoftmax(data.class_counts.tolist(), tau).to(device)
    lr = LIFT_LR * batch_size / LIFT_BATCH if lr is None else lr
    training = lab_training(module, data, sampling_q=1.0, criterion=criterion, lr=lr, batch_size=batch_size,
                            **hyperparameters)

    def finish(used: list[dict]) -> Fitted:
        weight = (scale * F.normalize(module.weight, dim=1)).detach().clone()
        return Fitted(LinearHead(weight, None, normalize_input=True),
                      {**used[0], "scale": scale, "tau": tau, "init": init, "sampling": "instance"})

    return Plan([training], finish)

# ------------------------------------------------------------------------------ with CLIP's zero-shot text head

CLIP = "Radford, Kim, Hallacy, Ramesh, Goh, Agarwal, Sastry, Askell, Mishkin, Clark, Krueger & Sutskever, ICML 2021"
ZERO_SHOT_CARD = Card(
    paper=CLIP, title="Learning Transferable Visual Models From Natural Language Supervision",
    code="openai/CLIP: notebooks/Prompt_Engineering_for_ImageNet.ipynb (zeroshot_classifier); mlfoundations/"
         "open_clip: src/open_clip/zero_shot_classifier.py (build_zero_shot_classifier)",
    matches=("Logits = logit_scale * normalize(f) @ W_text.T, W_text the normalized mean of the normalized prompt "
             "embeddings of each class (open_clip's own build_zero_shot_classifier, run at extract --zero-shot).",),
    features="CLIP's projected image embedding (extract --backbone open_clip:ARCH/TAG --zero-shot).",
    reference_test="tests/test_frozen_libraries.py::test_zero_shot_zs_ensemble_and_gla_run_on_the_text_head")


@method("zero_shot", summary="CLIP's zero-shot text head as extracted (Radford et al. ICML 2021): class-name "
        "prompts, no training", text=True, card=ZERO_SHOT_CARD, task="zeroshot_classification")
def fit_zero_shot(data: LabData) -> Fitted:
    return Fitted(data.text, {})


ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))
ZS_ENSEMBLE_CARD = Card(
    paper="Zhu, Tang, Sun & Zhang, NeurIPS 2023 (its output-space ensemble baseline)",
    title="Generalized Logit Adjustment: Calibrating Fine-tuned Models by Removing Label Bias in Foundation Models",
    code=None,
    matches=("Logits (1 - a) * joint + a * zero-shot, the weighted output ensemble GLA is measured against.",),
    deviations=(Deviation("a is chosen on the selection split from 0, 0.1, ..., 1.",
                          "The baseline has no official code to follow; choosing the weight on val gives it its best "
                          "honest chance."),
                Deviation("la_tau > 0 first subtracts la_tau * log(train prior) from the joint part.",
                          "An option beyond the baseline: the joint head's own label bias removed, as logit_adj "
                          "does.")),
    reference_test="tests/test_frozen_libraries.py::test_zs_ensemble_is_the_chosen_mix_of_the_joint_and_text_logits")


@method("zs_ensemble", Param("alphas", GRID, ALPHAS, "Weight a of the zero-shot logits: (1 - a) joint + a "
                             "zero-shot, chosen on the selection split.", low=0, high=1, max_points=100),
        Param("la_tau", float, 0.0, "Logit adjustment of the joint part first: joint - la_tau log(train prior) "
              "(0: the joint head as it is).", low=0, high=10),
        summary="output-space ensemble of the joint head and CLIP's zero-shot text head, the weight chosen on the "
        "selection split (the naive ensemble of Zhu et al. NeurIPS 2023)", text=True, card=ZS_ENSEMBLE_CARD)
def fit_zs_ensemble(data: LabData, *, alphas, la_tau: float) -> Fitted:
    import torch

    from ltcache.stage2.methods.weight_norms import log_prior

    weight = data.joint.weight
    bias = data.joint.bias if data.joint.bias is not None else torch.zeros(data.num_classes, device=weight.device)
    bias = bias - la_tau * log_prior(data, weight.device)
    text = data.text.weight.to(weight.device)
    curve, best = [], None
    for alpha in alphas:
        alpha = float(alpha)
        head = LinearCosineHead((1 - alpha) * weight, alpha * text, (1 - alpha) * bias, data.text.projection)
        score = data.selection_score(head)
        curve.append({"alpha": alpha, "mean_per_class": score})
        if best is None or score > best[0]:
            best = (score, alpha, head)
    score, alpha, head = best
    return Fitted(head, {"alpha": alpha, "la_tau": la_tau, "selected_on": data.selected_on,
                         "selection_mean_per_class": round(score, 4)}, curve)


def estimate_label_bias(logits, labels, class_counts, *, max_iter: int = 200) -> tuple:
    """GLA's bias estimate (Zhu et al. 2023): the log prior log q that the zero-shot logits z carry, found on
    labelled data whose own prior pi_s is known as argmin over the simplex of CE(z - log q + log pi_s, y) (pi_s
    uniform on a balanced split, where it drops out, as in the official pp_solver). With q = softmax(b) the problem is
    convex in b and its optimum lies inside the simplex, so L-BFGS over row blocks of `logits` (a tensor or a
    BlockLogits) solves it. Returns (log q, L-BFGS steps, final loss). At the optimum the mean softmax over the rows
    equals pi_s in every class."""
    import torch
    import torch.nn.functional as F

    from ltcache.logits import chunk_rows, labelled_blocks

    counts = torch.as_tensor(class_counts, dtype=torch.float32, device=labels.device).clamp_min(1)
    log_split = torch.log(counts / counts.sum())
    bias = torch.zeros_like(log_split, requires_grad=True)
    optimizer = torch.optim.LBFGS([bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    rows, evaluations = len(labels), [0]

    def closure():
        optimizer.zero_grad()
        total = 0.0
        for block, block_labels in labelled_blocks(logits, labels, chunk_rows(len(log_split))):
            loss = F.cross_entropy(block.float() - bias + log_split, block_labels, reduction="sum") / rows
            loss.backward()
            total += loss.item()
        evaluations[0] += 1
        return torch.tensor(total)

    loss = optimizer.step(closure)
    estimate = torch.log_softmax(bias.detach(), 0)
    return estimate, evaluations[0], float(loss)


GLA_CARD = Card(
    paper="Zhu, Tang, Sun & Zhang, NeurIPS 2023",
    title="Generalized Logit Adjustment: Calibrating Fine-tuned Models by Removing Label Bias in Foundation Models",
    code="BeierZhu/GLA: GLA.FS.public.zip trainers/util.py (Calibrater.search_T, pp_solver, CLIP.pp_estimate), "
         "trainers/gla.py (GLA.test, post_hoc_gla); Code.zip src/models/modeling.py (gla_inference)",
    matches=("Each head is calibrated by confidence matching: T such that the mean largest softmax probability of "
             "logits / T equals the accuracy (calibrate=true); the zero-shot head on the balanced selection split.",
             "The zero-shot label bias q is the maximum-likelihood prior on the simplex of softmax(z_zs / T_zs - log "
             "q) on a balanced labelled split, val by default (estimate_on=val).",
             "logits = joint / T_joint - log(train prior) + zero-shot / T_zs - log q: gla_inference's zs + ft - "
             "log q - log p, with p the fine-tuned head's label prior, on calibrated logits as in post_hoc_gla."),
    deviations=(Deviation("T by bisection on log T until the mean confidence equals the accuracy (the official "
                          "search stops at a gap of 0.1 points for the zero-shot head and 1 point for the "
                          "fine-tuned one).",
                          "The same target, solved to tolerance: the official stopping gaps leave T a few percent "
                          "from it."),
                Deviation("q = softmax(b) fitted by L-BFGS to convergence (the official pp_solver: cooper's "
                          "Lagrangian SGD, 1,000 steps at lr 1e-5 * shots / 50).",
                          "The same convex problem, whose optimum lies inside the simplex; a fixed small step budget "
                          "can stop short of it."),
                Deviation("The 'fine-tuned model' is the cache's joint head on frozen features.",
                          "GLA fine-tunes CLIP (or prompt-tunes it); stage 2 never changes the features."),
                Deviation("Both temperatures are fitted on the selection split (val; train with --select train), "
                          "the joint head's with the rows reweighted to the train prior.",
                          "The official code calibrates on val, ltcache's selection split, and its released "
                          "(few-shot) code fine-tunes on balanced data, where the weights are 1. A long-tailed "
                          "joint head is a model of the train distribution: matched on balanced rows, where it is "
                          "least accurate, its logits are flattened and - log(train prior) then over-corrects toward "
                          "the tail classes."),
                Deviation("estimate_on=train estimates q on the labelled train split with its own prior removed; "
                          "calibrate=false sums raw logits (ltcache's earlier form).",
                          "Options beyond the official recipe, for comparison; a test shows the uncalibrated form "
                          "losing to the official one on an over-sharp zero-shot head.")),
    features="CLIP's projected image embedding, which the text head needs (extract --zero-shot).",
    reference_test="tests/test_foundation_heads.py::test_gla_equals_a_hand_written_official_recipe")


@method("gla",
        Param("calibrate", bool, True, "Divide each head's logits by its confidence-matched temperature (fitted on "
              "the selection split) before estimating and summing, as the official recipe."),
        Param("estimate_on", str, "val", "Split the zero-shot label bias is estimated on: val (balanced, the official "
              "recipe) or train (its own prior removed).", choices=("val", "train")),
        summary="generalized logit adjustment (Zhu et al. NeurIPS 2023): both heads calibrated, CLIP's zero-shot label "
        "bias estimated on a balanced split and removed, the train prior removed from the joint head, the two summed",
        text=True, card=GLA_CARD)
def fit_gla(data: LabData, *, calibrate: bool, estimate_on: str) -> Fitted:
    """z = joint / T_joint - log pi_train + zero-shot / T_zs - log q, with q from estimate_label_bias on the
    calibrated zero-shot logits of `estimate_on`: GLA's equal-weight ensemble, Bayes-optimal for a balanced test set
    when both heads are calibrated to their priors."""
    import torch

    from ltcache.metrics.calibration import confidence_matched_temperature
    from ltcache.stage2.methods.weight_norms import log_prior

    estimation = data.split(estimate_on)
    if estimation is None:
        raise LtcacheError("gla.estimate_on=val needs a val split, which this cache lacks; pass --set "
                           "gla.estimate_on=train")
    joint, text = data.joint, data.text.to(data.joint.weight.device)
    selection = data.selection
    # The joint head is calibrated to its own label distribution: the selection rows reweighted to the train prior
    # (on a split already drawn from it, as --select train, the weights are 1).
    selection_counts = torch.bincount(selection.labels, minlength=data.num_classes).double().clamp_min(1)
    train_counts = torch.as_tensor(data.class_counts, dtype=torch.float64, device=selection_counts.device)
    to_train_prior = (train_counts / train_counts.sum()) / (selection_counts / selection_counts.sum())
    t_joint = confidence_matched_temperature(data.logits(joint, selection.features), selection.labels,
                                             class_weights=to_train_prior) if calibrate else 1.0
    t_text = confidence_matched_temperature(data.logits(text, selection.features), selection.labels) \
        if calibrate else 1.0
    text = LinearHead(text.weight / t_text, None, normalize_input=True, projection=text.projection)
    counts = torch.bincount(estimation.labels, minlength=data.num_classes).cpu().numpy()
    log_q, evaluations, loss = estimate_label_bias(data.logits(text, estimation.features), estimation.labels, counts)
    device = joint.weight.device
    bias = joint.bias if joint.bias is not None else torch.zeros(data.num_classes, device=device)
    head = LinearCosineHead(joint.weight / t_joint, text.weight,
                            bias / t_joint - log_prior(data, device) - log_q.to(device), text.projection)
    spread = log_q.max().item() - log_q.min().item()
    chosen = {"calibrate": calibrate, "estimate_on": estimate_on, "temperature_joint": round(t_joint, 6),
              "temperature_zero_shot": round(t_text, 6), "bias_spread": round(spread, 4),
              "lbfgs_evaluations": evaluations, "bias_loss": round(loss, 6)}
    if calibrate:
        chosen["selected_on"] = data.selected_on
    return Fitted(head, chosen)


# ------------------------------------------------------------------------------------------------------- LP++

LP_PP_EPOCHS, LP_PP_ALPHA_EVERY = 300, 10  # configs/base.yaml train_epoch (linear probe: 300); alpha every 10 epochs
LP_PP_CARD = Card(
    paper="Huang, Shakeri, Dolz, Boudiaf, Bahig & Ben Ayed, CVPR 2024",
    title="LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP",
    code="FereshteShakeri/FewShot-CLIP-Strong-Baseline: methods/linear_probe_p2.py (LinearProbe_P2, calculate_lr_w, "
         "calculate_init_alpha, calculate_lr_alpha), methods/utils.py (compute_centroids), configs/base.yaml",
    matches=("logits = W f + b + alpha_j (f . t_j), f the L2-normalized image feature and t_j the normalized text "
             "embedding of class j: a linear probe blended class-wise with the zero-shot head.",
             "W starts at the per-class sums of the train features (compute_centroids), b at nn.Linear's default, "
             "alpha at 250 x the mean over classes of each class's mean text similarity (calculate_init_alpha).",
             "Full-batch gradient steps: SGD with momentum 0.9 on W and b at lr 4N / lambda_max(F^T F); alpha "
             "stepped every 10 epochs at lr N / (4 max_j sum_i (f_i . t_j)^2) along its gradient, which the official "
             "loop never zeroes (so the step uses the gradients summed since the start); 300 epochs.",
             "The head of the epoch best on the selection split is kept (ties: the later epoch, as acc_val >= "
             "best_acc)."),
    deviations=(Deviation("The epoch is chosen by mean per-class accuracy on the selection split (the official code: "
                          "accuracy on val).",
                          "Every ltcache choice uses mean per-class accuracy; on a balanced val split they agree."),
                Deviation("init=means starts W at the class means instead of the sums.",
                          "An option beyond the official method: on a long-tailed train set the sums give the head "
                          "classes much larger initial weights, which the few-shot setting (equal shots) never "
                          "sees."),
                Deviation("The gradients are computed a block of train rows at a time in float32.",
                          "The same full-batch step; the official code holds the N x C logits whole, in CLIP's "
                          "dtype.")),
    features="CLIP's projected image embedding and its text head (extract --zero-shot; with --features both the "
             "pre-projection features are projected first).",
    reference_test="tests/test_frontier_heads.py::test_lp_pp_equals_the_official_loop")


@method("lp_pp",
        Param("epochs", int, LP_PP_EPOCHS, "Full-batch gradient steps (the official train_epoch).", low=1,
              high=100_000),
        Param("alpha_every", int, LP_PP_ALPHA_EVERY, "Epochs between the steps of alpha (the official 10).", low=1,
              high=100_000),
        Param("init", str, "sums", "Initial W: sums (the official per-class sums of the train features) or means.",
              choices=("sums", "means")),
        summary="LP++ (Huang et al. CVPR 2024): a linear probe plus class-wise weights alpha_j on CLIP's zero-shot "
        "logits, full-batch steps at data-derived step sizes, the epoch chosen on the selection split", text=True,
        stochastic=True, card=LP_PP_CARD)
def fit_lp_pp(data: LabData, *, epochs: int, alpha_every: int, init: str) -> Fitted:
    import torch
    import torch.nn.functional as F

    from ltcache.stage2.methods.neighbours import text_space

    train = data.train
    features = text_space(data, train.features)
    labels = train.labels
    rows, dim = features.shape
    device = features.device
    text = F.normalize(data.text.weight.to(device).float(), dim=1)  # t_j, without CLIP's logit scale
    classes = data.num_classes
    torch.manual_seed(data.seed)
    counts = torch.bincount(labels, minlength=classes).float()
    weight = torch.zeros(classes, dim, device=device).index_add_(0, labels, features)
    if init == "means":
        weight /= counts.clamp_min(1)[:, None]
    bias = torch.nn.Linear(dim, classes).bias.detach().to(device)  # nn.Linear's default bias, drawn after its weight
    similarity_sums = torch.zeros(classes, device=device)
    squares = torch.zeros(classes, device=device)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for block, block_labels in zip(features.split(LOGIT_CHUNK_ROWS), labels.split(LOGIT_CHUNK_ROWS), strict=True):
        similarity = block @ text.T
        similarity_sums.index_add_(0, block_labels, similarity.gather(1, block_labels[:, None])[:, 0])
        squares += similarity.square().sum(0)
        gram += block.double().T @ block.double()
    present = counts > 0
    alpha = torch.full((classes,), 250 * float((similarity_sums[present] / counts[present]).mean()), device=device)
    lr_w = 4 * rows / float(torch.linalg.eigvalsh(gram).max())
    lr_alpha = rows / (4 * float(squares.max()))
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    alpha_gradient = torch.zeros_like(alpha)
    best = None
    for epoch in range(1, epochs + 1):
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
        for block, block_labels in zip(features.split(LOGIT_CHUNK_ROWS), labels.split(LOGIT_CHUNK_ROWS),
                                       strict=True):
            similarity = block @ text.T
            logits = torch.addmm(bias, block, weight.T) + alpha * similarity
            residual = torch.softmax(logits, dim=1)
            residual[torch.arange(len(block_labels), device=device), block_labels] -= 1
            residual /= rows  # d(mean CE)/d logits
            grad_w.addmm_(residual.T, block)
            grad_b += residual.sum(0)
            alpha_gradient += (residual * similarity).sum(0)  # never zeroed, as the official loop
        for parameter, velocity, gradient in ((weight, velocity_w, grad_w), (bias, velocity_b, grad_b)):
            velocity.mul_(0.9).add_(gradient) if epoch > 1 else velocity.copy_(gradient)
            parameter.sub_(lr_w * velocity)
        if epoch % alpha_every == 0:
            alpha -= lr_alpha * alpha_gradient
        head = LinearHead(weight + alpha[:, None] * text, bias.clone(), normalize_input=True,
                          projection=data.text.projection)
        score = data.selection_score(head)
        if best is None or score >= best[0]:
            best = (score, LinearHead(head.weight.clone(), head.bias, True, None, head.projection), epoch,
                    alpha.clone())
    score, head, epoch, alpha = best
    return Fitted(head, {"epochs": epochs, "epoch_kept": epoch, "init": init, "alpha_every": alpha_every,
                         "lr_w": round(lr_w, 6), "lr_alpha": round(lr_alpha, 6),
                         "alpha_min": round(alpha.min().item(), 4), "alpha_max": round(alpha.max().item(), 4),
                         "selected_on": data.selected_on, "selection_mean_per_class": round(score, 4)})
