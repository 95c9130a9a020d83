"""Methods trained on frozen features: cRT and its variants, LWS (Sec. 4, Eq. 4), learned tau (App. B.5).

Their torch modules live in stage2/modules.py and the shared trainer in stage2/training.py; both are imported when a
fit runs, so registering these methods costs no torch import."""

from __future__ import annotations

import numpy as np

from ltcache.core.errors import LtcacheError
from ltcache.core.params import GRID, Param
from ltcache.heads import LinearHead
from ltcache.stage2.cards import CLASSIFIER_BALANCING, DECOUPLING, KANG_2020, Card, Deviation
from ltcache.stage2.core import Fitted, LabData, with_defaults
from ltcache.stage2.methods.weight_norms import tau_normalize, weight_norms
from ltcache.stage2.training import TRAINER_DEVIATIONS, TRAINING, Plan, lab_training, linear_head, planned_method

REFERENCE = "tests/test_reference.py::test_trained_head_equals_hand_written_sgd[{}]"

CRT_CARD = Card(
    paper=KANG_2020, title=DECOUPLING,
    code=f"{CLASSIFIER_BALANCING}: config/ImageNet_LT/cls_crt.yaml, run_networks.py, models/DotProductClassifier.py",
    matches=("A re-initialized linear classifier (W, b) trained on frozen features with class-balanced sampling and "
             "cross-entropy.",
             "cls_crt.yaml: SGD, momentum 0.9, weight decay 5e-4, lr 0.2 at batch 512, cosine to 0, 10 epochs."),
    deviations=TRAINER_DEVIATIONS + (
        Deviation("solver=lbfgs (an option) fits the same class-weighted objective full-batch.",
                  "Class weights 1/n_y equal class-balanced sampling in expectation; an exact optimum in seconds."),),
    reference_test=REFERENCE.format("crt"))


@planned_method("crt", *TRAINING, Param("solver", str, "sgd", "sgd (the paper), or lbfgs: full batch, class "
                "weights 1/n_y.", choices=("sgd", "lbfgs")),
                Param("lbfgs_steps", int, 100, "L-BFGS iterations (solver=lbfgs).", low=1, high=100_000),
                summary="re-initialized linear classifier re-trained on frozen features, class-balanced; "
                "solver=lbfgs fits it full-batch", paper=3, weight_norms=True, card=CRT_CARD)
def fit_crt(data: LabData, *, solver: str, lbfgs_steps: int, **hyperparameters) -> Plan:
    if solver == "lbfgs":  # full batch: nothing to share with other points, it only finishes
        return Plan([], lambda used: fit_crt_lbfgs(data, steps=lbfgs_steps,
                                                   weight_decay=hyperparameters["weight_decay"]))
    return retrain_plan(data, lambda linear, used: Fitted(linear_head(linear), used), **hyperparameters)


def new_linear(data: LabData, linear_class=None, **options):
    """A freshly initialized linear classifier on the train features' device, drawn after torch.manual_seed(seed), as
    every re-trained head starts (so a point fitted in a grid starts where it would start alone)."""
    import torch
    from torch import nn

    torch.manual_seed(data.seed)
    features = data.train.features
    return (linear_class or nn.Linear)(features.shape[1], data.num_classes, **options).to(features.device)


def retrain_plan(data: LabData, finish, *, sampling_q: float = 0.0, criterion=None, linear=None,
                 **hyperparameters) -> Plan:
    """The plan of a linear classifier re-trained on the frozen train features: `finish(linear, used)`."""
    linear = new_linear(data) if linear is None else linear
    training = lab_training(linear, data, sampling_q=sampling_q, criterion=criterion, **hyperparameters)
    return Plan([training], lambda used: finish(linear, used[0]))


def fit_crt_lbfgs(data: LabData, *, steps: int, weight_decay: float) -> Fitted:
    """cRT fitted full-batch by L-BFGS: class-balanced sampling becomes class weights 1/n_y (the same objective
    in expectation), weight decay the matching 0.5 * wd * ||W||^2 penalty."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(data.seed)
    from ltcache.logits import as_float32

    features, labels = as_float32(data.train.features), data.train.labels  # full-batch: float16 rows upcast once
    linear = nn.Linear(features.shape[1], data.num_classes).to(features.device)
    counts = torch.bincount(labels, minlength=data.num_classes).clamp_min(1).to(features.dtype)
    class_weight = (1.0 / counts) / (1.0 / counts).mean()
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        loss = F.cross_entropy(linear(features), labels, weight=class_weight)
        return loss + 0.5 * weight_decay * linear.weight.pow(2).sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)  # returns the loss at the start, so the final objective is evaluated below
    with torch.no_grad():
        final = objective()
    if not torch.isfinite(final):
        raise LtcacheError("cRT with L-BFGS diverged; try crt.solver=sgd")
    iterations = optimizer.state[linear.weight].get("n_iter", steps)
    return Fitted(linear_head(linear), {"solver": "lbfgs", "lbfgs_steps": steps, "iterations": int(iterations),
                                        "weight_decay": weight_decay, "final_loss": round(final.item(), 6)})


CRT_BSM_CARD = Card(
    paper="Ren, Yu, Ma, Zhao, Yi & Li, NeurIPS 2020", title="Balanced Meta-Softmax for Long-Tailed Visual Recognition",
    code="jiawei-ren/BalancedMetaSoftmax-Classification: loss/BalancedSoftmaxLoss.py",
    matches=("The Balanced Softmax loss CE(z + log n_y / N) on instance-sampled batches.",),
    deviations=TRAINER_DEVIATIONS[1:] + (
        Deviation("The classifier is re-initialized and re-trained on frozen features with cRT's schedule, without "
                  "the Meta Sampler.",
                  "This is Balanced Softmax as a decoupled classifier; BALMS's meta-learned sampler needs the "
                  "images."),),
    reference_test=REFERENCE.format("crt_bsm"))


@planned_method("crt_bsm", *TRAINING,
                summary="classifier re-trained with Balanced Softmax (Ren et al. 2020), instance sampling",
                card=CRT_BSM_CARD)
def fit_crt_balanced_softmax(data: LabData, **hyperparameters) -> Plan:
    from ltcache.stage2.modules import BalancedSoftmax

    # The loss already corrects for the train prior, so batches follow the data (q = 1), not class-balanced.
    linear = new_linear(data)
    criterion = BalancedSoftmax(data.class_counts.tolist()).to(data.train.features.device)
    return retrain_plan(data, lambda linear, used: Fitted(linear_head(linear), {**used, "sampling": "instance"}),
                        sampling_q=1.0, criterion=criterion, linear=linear, **hyperparameters)


def label_aware_smoothing(class_counts, head: float, tail: float):
    """Zhong et al. 2021 (MiSLAS), concave form:
    eps_y = tail + (head - tail) * sin(pi/2 * (n_y - n_min) / (n_max - n_min))."""
    import torch

    counts = np.asarray(class_counts, dtype=np.float64)
    span = max(counts.max() - counts.min(), 1.0)
    return torch.tensor(tail + (head - tail) * np.sin(0.5 * np.pi * (counts - counts.min()) / span),
                        dtype=torch.float32)


CRT_LAS_CARD = Card(
    paper="Zhong, Cui, Liu & Jia, CVPR 2021", title="Improving Calibration for Long-Tailed Recognition",
    code="dvlab-research/MiSLAS: methods.py (LabelAwareSmoothing), train_stage2.py, config/*/*_stage2_mislas.yaml",
    matches=("Label-aware smoothing, concave form: eps_y = tail + (head - tail) sin(pi/2 (n_y - n_min) / (n_max - "
             "n_min)), loss (1 - eps_y) NLL - eps_y mean_j log p_j.",
             "Defaults head 0.4, tail 0.1: MiSLAS's CIFAR-100-LT (IF 100) config (its ImageNet-LT config uses 0.3 "
             "and 0.0)."),
    deviations=TRAINER_DEVIATIONS + (
        Deviation("No shift learning of the batch-norm statistics, and no mixup in stage 1.",
                  "Stage 2 sees cached features only; ltcache's stage 1 is the paper's."),),
    reference_test=REFERENCE.format("crt_las"))


@planned_method("crt_las", *TRAINING,
                Param("smooth_head", float, 0.4, "Smoothing of the most frequent class.", low=0, below=1),
                Param("smooth_tail", float, 0.1, "Smoothing of the rarest class.", low=0, below=1),
                summary="classifier re-trained with label-aware smoothing (Zhong et al. 2021), class-balanced",
                card=CRT_LAS_CARD)
def fit_crt_label_aware_smoothing(data: LabData, *, smooth_head: float, smooth_tail: float,
                                  **hyperparameters) -> Plan:
    from ltcache.stage2.modules import SmoothedCrossEntropy

    linear = new_linear(data)
    epsilon = label_aware_smoothing(data.class_counts, smooth_head, smooth_tail).to(data.train.features.device)
    return retrain_plan(data, lambda linear, used: Fitted(linear_head(linear), {
        **used, "smooth_head": smooth_head, "smooth_tail": smooth_tail}),
        criterion=SmoothedCrossEntropy(epsilon), linear=linear, **hyperparameters)


CRT_MAXNORM_CARD = Card(
    paper="Alshammari, Wang, Ramanan & Kong, CVPR 2022", title="Long-Tailed Recognition via Weight Balancing",
    code="ShadeAlsha/LTR-weight-balancing: demo2_second-stage-training.py, utils/regularizers.py (MaxNorm_via_PGD), "
         "utils/trainval.py",
    matches=("Weight decay plus a per-class MaxNorm constraint, enforced by projected gradient descent: every "
             "classifier row outside the ball is scaled back to its surface.",
             "The projection runs after every optimizer step, as the paper (page 4) and the authors' answer in "
             "LTR-weight-balancing issue #5 say; the released trainval.py projects once per epoch, a known bug."),
    deviations=TRAINER_DEVIATIONS + (
        Deviation("The classifier is re-initialized and trained with cross-entropy on class-balanced batches, weight "
                  "decay 5e-3, the cap a multiple of the joint head's median row norm chosen on the selection split "
                  "(0.5, 1, 2, 4, 8).",
                  "The official demo fine-tunes the stage-1 classifier with the class-balanced focal loss (beta "
                  "0.9999, gamma 2) at lr 0.01, weight decay 0.1 and an absolute cap of 0.1, and keeps its best "
                  "epoch on test; ltcache keeps cRT's protocol and scales the cap to the features, choosing it on "
                  "val."),),
    reference_test=REFERENCE.format("crt_maxnorm"))


@planned_method("crt_maxnorm", *with_defaults(TRAINING, weight_decay=5e-3),
                Param("max_norms", GRID, (0.5, 1.0, 2.0, 4.0, 8.0), "Norm caps to choose among, in multiples of "
                      "the joint head's median row norm.", above=0, max_points=100),
                summary="classifier re-trained with weight decay + MaxNorm (Alshammari et al. 2022) projected after "
                "every step; the norm cap chosen on the selection split", card=CRT_MAXNORM_CARD)
def fit_crt_maxnorm(data: LabData, *, max_norms, **hyperparameters) -> Plan:
    """max_norms are multiples of the joint classifier's median row norm; each is fitted (in one pass), the best
    on the selection split kept."""
    from ltcache.stage2.modules import MaxNormLinear

    scale = data.joint.weight.norm(dim=1).median().item()
    multiples = [float(multiple) for multiple in max_norms]
    linears = [new_linear(data, MaxNormLinear, cap=multiple * scale) for multiple in multiples]
    trainings = [lab_training(linear, data, **hyperparameters) for linear in linears]

    def finish(used: list[dict]) -> Fitted:
        candidates = []
        for linear, multiple, point in zip(linears, multiples, used, strict=True):
            head = linear_head(linear)
            candidates.append((data.selection_score(head), -multiple, head, point, multiple))
        score, _, head, point, multiple = max(candidates, key=lambda c: (c[0], c[1]))
        return Fitted(head, {**point, "max_norm": round(multiple * scale, 4), "max_norm_multiple": multiple,
                             "selected_on": data.selected_on, "selection_mean_per_class": round(score, 4)},
                      [{"max_norm_multiple": c[4], "mean_per_class": c[0]} for c in candidates])

    return Plan(trainings, finish)


COS_CARD = Card(
    paper=f"{KANG_2020} (Table 12), after Gidaris & Komodakis, CVPR 2018", title=DECOUPLING,
    code=f"{CLASSIFIER_BALANCING}: models/CosNormClassifier.py",
    matches=("s * cos(f, w_j) with a learned scale s, re-trained on frozen features with class-balanced sampling.",),
    deviations=TRAINER_DEVIATIONS + (
        Deviation("The features are fully L2-normalized and the scale is learned (from 16); the weights start at "
                  "N(0, 0.01^2).",
                  "The official CosNorm_Classifier (from OLTR) keeps the scale fixed at 16, squashes the feature norm "
                  "to ||x|| / (1 + ||x||) instead of removing it, and starts from U(-1/sqrt(d), 1/sqrt(d)); ltcache "
                  "implements Gidaris & Komodakis's cosine classifier with a learned scale, which the paper's "
                  "Table 12 names."),),
    reference_test=REFERENCE.format("cos"))


@planned_method("cos", *TRAINING, Param("scale", float, 16.0, "Initial scale s (learned).", above=0),
                summary="cosine classifier with a learned scale re-trained on frozen features (Table 12)",
                card=COS_CARD)
def fit_cosine_classifier(data: LabData, *, scale: float, **hyperparameters) -> Plan:
    import torch
    import torch.nn.functional as F

    from ltcache.stage2.modules import CosineClassifier

    torch.manual_seed(data.seed)
    features = data.train.features
    module = CosineClassifier(features.shape[1], data.num_classes, scale, features.device)

    def finish(used: list[dict]) -> Fitted:
        weight = (module.scale * F.normalize(module.weight, dim=1)).detach().clone()
        return Fitted(LinearHead(weight, None, normalize_input=True),
                      {**used[0], "scale": round(module.scale.item(), 4)})

    return Plan([lab_training(module, data, **hyperparameters)], finish)


LWS_CARD = Card(
    paper=KANG_2020, title=DECOUPLING,
    code=f"{CLASSIFIER_BALANCING}: config/ImageNet_LT/cls_lws.yaml, models/TauNormClassifier.py",
    matches=("Eq. 4: learnable per-class scales f_j (init 1) on the frozen joint W, class-balanced, cross-entropy.",
             "cls_lws.yaml: 5 epochs, lr 0.2 at batch 512, weight decay 5e-4, momentum 0.9, cosine to 0."),
    deviations=TRAINER_DEVIATIONS + (
        Deviation("By default the bias is not scaled (with_bias=false): the logits are f_j (w_j . x) + b_j.",
                  "Eq. 4 scales the weights only; the official TauNormClassifier.py scales fc(x) = W x + b, which "
                  "with_bias=true reproduces (the recipes marked 'as the official' set it)."),),
    reference_test=REFERENCE.format("lws"))


@planned_method("lws", *with_defaults(TRAINING, epochs=5),
                Param("with_bias", bool, False, "Scale the joint bias too (the official code)."),
                summary="learnable per-class scales f_j on the joint W (Eq. 4), class-balanced; with_bias scales b "
                "too, as the official code", paper=5, weight_norms=True, card=LWS_CARD)
def fit_lws(data: LabData, *, with_bias: bool, **hyperparameters) -> Plan:
    from ltcache.stage2.modules import ScaleLogits

    bias = data.joint.bias if with_bias and data.joint.bias is not None else None
    raw = data.raw_logits(data.fitting, bias)  # whole when it fits the memory budget, else per batch
    scaling = ScaleLogits(data.num_classes, raw.device)

    def finish(used: list[dict]) -> Fitted:
        scales = scaling.scales.detach().clone().to(data.joint.weight.device)
        head = LinearHead(data.joint.weight * scales[:, None], bias * scales if bias is not None else None)
        scale_range = {"scale_min": round(scales.min().item(), 4), "scale_max": round(scales.max().item(), 4)}
        return Fitted(head, {**used[0], "with_bias": with_bias, **scale_range})

    return Plan([lab_training(scaling, data, raw, **hyperparameters)], finish)


TAU_LEARNED_CARD = Card(
    paper=f"{KANG_2020} (Appendix B.5, Table 9)", title=DECOUPLING, code=None,
    matches=("tau as the one parameter of the tau-normalized classifier W / ||w_j||^tau (bias dropped), learned "
             "with class-balanced sampling on the train set, W fixed.",),
    deviations=TRAINER_DEVIATIONS + (
        Deviation("LWS's schedule (5 epochs, lr 0.2 at batch 512), without weight decay; tau starts at 0.",
                  "The paper gives no schedule and no code for learned tau; weight decay would pull tau to 0."),),
    reference_test=REFERENCE.format("tau_learned"))


@planned_method("tau_learned", *with_defaults(TRAINING, epochs=5, weight_decay=0.0),
                summary="tau learned with class-balanced sampling, W fixed (Appendix B.5)", card=TAU_LEARNED_CARD)
def fit_tau_learned(data: LabData, **hyperparameters) -> Plan:
    import torch

    from ltcache.stage2.modules import LearnedTau

    raw = data.raw_logits(data.fitting)
    module = LearnedTau(torch.log(weight_norms(data.joint.weight)).to(raw.device))

    def finish(used: list[dict]) -> Fitted:
        tau = round(module.tau.item(), 4)
        return Fitted(LinearHead(tau_normalize(data.joint.weight, tau)), {"tau": tau, **used[0]})

    return Plan([lab_training(module, data, raw, **hyperparameters)], finish)
