"""Calibrations of the joint logits trained with generalized re-weighting (DisAlign, MARC) and the MLP classifier."""

from __future__ import annotations

import functools

import numpy as np

from ltcache.core.params import Param
from ltcache.heads import DisAlignHead, LinearHead, MLPHead
from ltcache.stage2.cards import DECOUPLING, KANG_2020, Card, Deviation
from ltcache.stage2.core import Fitted, LabData, with_defaults
from ltcache.stage2.training import TRAINER_DEVIATIONS, TRAINING, Plan, lab_training, planned_method

REFERENCE = "tests/test_reference.py::test_trained_head_equals_hand_written_sgd[{}]"


def generalized_reweighting(class_counts, exp_scale: float):
    """Zhang et al. 2021, Eq. 9: w_c ∝ (1 / r_c)^rho with r_c the train share of class c; mean weight 1."""
    import torch

    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    weights = (counts / counts.sum()) ** -float(exp_scale)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


DISALIGN_CARD = Card(
    paper="Zhang, Li, Yan, He & Sun, CVPR 2021", title="Distribution Alignment: A Unified Framework for Long-tail "
    "Visual Recognition",
    code="Megvii-BaseDetection/DisAlign: classification/imagenetlt/resnext50/resx50.scratch.imagenet_lt.224size.90e."
         "disalign.10e/{net.py,config.py} (cvpods DisAlignLinear, GRWCrossEntropyLoss)",
    matches=("The joint logits z calibrated per class, sigma(x) (alpha_j z_j + beta_j) + (1 - sigma(x)) z_j, with a "
             "confidence gate sigma(x) = sigmoid(v . f + c); alpha starts at 1, beta at 0; W and b frozen.",
             "The generalized re-weighting loss: class weights (1 / r_c)^rho with rho 1.2 (GRW_SCALE), mean 1, a "
             "weighted cross-entropy on instance-sampled batches; 10 epochs, cosine lr."),
    deviations=TRAINER_DEVIATIONS[1:] + (
        Deviation("lr 0.02 at batch 512 and no weight decay (the official config: lr 0.1 at batch 256, weight decay "
                  "5e-4).",
                  "alpha and beta act on the logits directly: at the official rate they overshot on "
                  "fashion-mnist-lt (alpha went negative and val accuracy fell, as fit_disalign's docstring "
                  "records), while on digits-lt and an ImageNet-LT-shaped cache the lower rate lost nothing on "
                  "val. --set disalign.lr=0.2 --set disalign.weight_decay=5e-4 gives the official values."),),
    reference_test=REFERENCE.format("disalign"))


@planned_method("disalign", *with_defaults(TRAINING, weight_decay=0.0, lr=0.02),
                  Param("exp_scale", float, 1.2, "rho of the generalized re-weighting, w_c ~ (1/r_c)^rho.", low=0),
                  summary="DisAlign (Zhang et al. 2021): per-class magnitude and margin on the joint logits, a "
                  "confidence gate, generalized re-weighting loss (instance sampling)", card=DISALIGN_CARD)
def fit_disalign(data: LabData, *, exp_scale: float, **hyperparameters) -> Plan:
    """lr 0.02, not cRT's 0.2: alpha and beta act on the logits directly, and at 0.2 they overshot on
    fashion-mnist-lt (val mean/class 67.0 against 76.5, alpha went negative); on digits-lt and the synthetic
    ImageNet-LT shape 0.02 was within 0.5 points of 0.2 on val."""
    import torch
    from torch import nn

    from ltcache.stage2.modules import DisAlign

    torch.manual_seed(data.seed)
    split = data.split(data.fitting)
    bias = data.joint.bias if data.joint.bias is not None else torch.zeros(data.num_classes)
    # One GEMM, then per-batch rows; per batch from the features when the logits would not fit the memory budget.
    joint_logits = data.raw_logits(data.fitting, bias.to(split.features.device))
    module = DisAlign(split.features.shape[1], data.num_classes, split.features.device)
    weights = generalized_reweighting(data.class_counts, exp_scale).to(split.features.device)
    # The loss re-weights toward the balanced reference distribution, so batches follow the data (q = 1).
    training = lab_training(module, data, (split.features, joint_logits), sampling_q=1.0,
                            criterion=nn.CrossEntropyLoss(weight=weights), **hyperparameters)

    def finish(used: list[dict]) -> Fitted:
        head = DisAlignHead(data.joint.weight, bias.to(data.joint.weight.device),
                            *(t.detach().clone() for t in (module.alpha, module.beta, module.confidence.weight[0],
                                                           module.confidence.bias[0])))
        ranges = {f"{name}_{end}": round(getattr(tensor, end)().item(), 4)
                  for name, tensor in (("alpha", module.alpha), ("beta", module.beta)) for end in ("min", "max")}
        return Fitted(head, {**used[0], "exp_scale": exp_scale, "sampling": "instance", **ranges})

    return Plan([training], finish)


MARC_CARD = Card(
    paper="Wang, Zhang, Xiang, Leung, Zhu & Tao, ACML 2022",
    title="Margin Calibration for Long-Tailed Visual Recognition",
    code="Imbalance-VLM/Imbalance-VLM: imblearn/algorithms/supervised/utils.py (MARC_Net, grw_loss), supervised.py, "
         "config/imb_clip_stage2_algs/supervised/imagenet_lt_grw_loss_None_marc_0.yaml",
    matches=("The joint logits z = W f + b recalibrated per class, a_j z_j + b_j ||w_j||, a starting at 1 and b at "
             "0, W and b frozen (MARC_Net).",
             "The generalized re-weighting loss (grw_loss: class weights (1 / n_c)^1.2, mean 1) on instance-sampled "
             "batches; SGD lr 0.03 at batch 256, momentum 0.9, weight decay 5e-4, 10 epochs."),
    deviations=TRAINER_DEVIATIONS[1:] + (
        Deviation("Every epoch is trained (10 epochs of len(train) rows).",
                  "The Imbalance-VLM config also sets num_train_iter 30, which stops its loop after about 30 "
                  "steps; ltcache trains the epochs the config names."),),
    features="Any features with a joint head; Imbalance-VLM's are CLIP's image features under its linear head.",
    reference_test=REFERENCE.format("marc"))


@planned_method("marc", *with_defaults(TRAINING, epochs=10, batch_size=256, lr=0.03),
                Param("exp_scale", float, 1.2, "rho of the generalized re-weighting loss, w_c ~ (1/n_c)^rho.", low=0),
                summary="MARC margin calibration (Wang et al. ACML 2022, as Imbalance-VLM): per-class a_j z_j + b_j "
                "||w_j|| on the frozen joint logits, generalized re-weighting loss", card=MARC_CARD)
def fit_marc(data: LabData, *, exp_scale: float, **hyperparameters) -> Plan:
    """A linear head in the end: a_j (w_j . f + b_j) + b'_j ||w_j||."""
    import torch
    from torch import nn

    from ltcache.stage2.modules import MarginCalibration

    torch.manual_seed(data.seed)
    split = data.split(data.fitting)
    device = split.features.device
    bias = data.joint.bias if data.joint.bias is not None else torch.zeros(data.num_classes)
    joint_logits = data.raw_logits(data.fitting, bias.to(device))
    norms = data.joint.weight.norm(dim=1).to(device)
    module = MarginCalibration(norms)
    weights = generalized_reweighting(data.class_counts, exp_scale).to(device)
    training = lab_training(module, data, joint_logits, sampling_q=1.0,
                            criterion=nn.CrossEntropyLoss(weight=weights), **hyperparameters)

    def finish(used: list[dict]) -> Fitted:
        scale, margin = module.scale.detach().clone(), module.margin.detach().clone()
        weight = data.joint.weight * scale[:, None].to(data.joint.weight.device)
        head_bias = (scale * bias.to(device) + margin * norms).to(data.joint.weight.device)
        ranges = {f"{name}_{end}": round(getattr(tensor, end)().item(), 4)
                  for name, tensor in (("scale", scale), ("margin", margin)) for end in ("min", "max")}
        return Fitted(LinearHead(weight, head_bias), {**used[0], "exp_scale": exp_scale, "sampling": "instance",
                                                       **ranges})

    return Plan([training], finish)



def fit_mlp(data: LabData, *, layers: int, hidden: int, **hyperparameters) -> Plan:
    """Appendix B.6: `layers` Linear layers with ReLU between, `hidden` units each (0: the feature size),
    re-trained on frozen features with class-balanced sampling and a cosine lr, like cRT."""
    import torch
    from torch import nn

    from ltcache.stage2.modules import MLP

    torch.manual_seed(data.seed)
    dim = data.train.features.shape[1]
    width = hidden or dim
    module = MLP([dim] + [width] * (layers - 1) + [data.num_classes], data.train.features.device)

    def finish(used: list[dict]) -> Fitted:
        linears = [m for m in module if isinstance(m, nn.Linear)]
        head = MLPHead(tuple(m.weight.detach().clone() for m in linears),
                       tuple(m.bias.detach().clone() for m in linears))
        return Fitted(head, {**used[0], "layers": layers, "hidden": width})

    return Plan([lab_training(module, data, **hyperparameters)], finish)


def mlp_card(layers: int) -> Card:
    return Card(
        paper=f"{KANG_2020} (Appendix B.6, Table 10)", title=DECOUPLING, code=None,
        matches=(f"{layers} linear layers with ReLU between them, hidden width the feature size, re-trained on "
                 "frozen features like cRT (class-balanced, cRT's schedule).",),
        deviations=TRAINER_DEVIATIONS,
        reference_test=REFERENCE.format(f"mlp{layers}"))


for _layers in (2, 3):
    planned_method(f"mlp{_layers}", *TRAINING,
                     Param("hidden", int, 0, "Units per hidden layer (0: the feature size).", low=0, high=1 << 20),
                     summary=f"{_layers}-layer MLP (ReLU) re-trained on frozen features, class-balanced "
                     "(Appendix B.6, Table 10)", card=mlp_card(_layers))(functools.partial(fit_mlp, layers=_layers))

