import numpy as np
import pytest
import torch

from ltcache.core.errors import LtcacheError
from ltcache.data.samplers import EpochSampler, SamplerName
from ltcache.stage1.models import build_model, select_trainable

LABELS = np.array([0] * 900 + [1] * 90 + [2] * 10)


def test_instance_sampler_is_a_permutation_per_epoch():
    sampler = EpochSampler(LABELS, SamplerName.instance, total_epochs=3, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(len(LABELS)))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_class_balanced_sampler_draws_classes_uniformly():
    sampler = EpochSampler(LABELS, SamplerName.klass, total_epochs=1, seed=0)
    drawn = np.bincount(LABELS[list(sampler)], minlength=3) / len(LABELS)
    np.testing.assert_allclose(drawn, [1 / 3] * 3, atol=0.05)


def test_progressive_sampler_moves_from_instance_to_class_balanced():
    sampler = EpochSampler(LABELS, SamplerName.progressive, total_epochs=10, seed=0)
    tail_share = []
    for epoch in (0, 9):
        sampler.set_epoch(epoch)
        tail_share.append(np.mean(LABELS[list(sampler)] == 2))
    assert tail_share[0] < 0.03  # ~1% under instance-balanced sampling
    assert tail_share[1] > 0.25  # 0.1 * 1% + 0.9 * 33%


def test_ranks_split_one_epoch_without_overlap():
    shards = [list(EpochSampler(LABELS, SamplerName.instance, total_epochs=1, seed=3, rank=r, world=2))
              for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(len(LABELS)))


def test_ranks_get_equal_lengths_when_the_split_does_not_divide():
    labels = LABELS[:7]
    samplers = [EpochSampler(labels, SamplerName.instance, total_epochs=1, seed=0, rank=r, world=3) for r in range(3)]
    shards = [list(s) for s in samplers]
    assert [len(s) for s in shards] == [3, 3, 3] == [len(s) for s in samplers]
    assert set(sum(shards, [])) == set(range(7))  # all covered; two samples repeat to pad


@pytest.mark.parametrize("arch, in_channels, size, dim", [
    ("smallresnet8", 1, 8, 64), ("smallresnet14", 1, 28, 128), ("resnet32", 3, 32, 64),
    ("resnet10", 3, 32, 512), ("resnet18", 1, 28, 512), ("resnet50", 3, 32, 2048),
    ("resnext50_32x4d", 3, 32, 2048), ("resnext101_32x4d", 3, 32, 2048), ("resnext152_32x4d", 3, 32, 2048),
    ("vgg11", 3, 32, 4096),  # classifier[-1]
    ("efficientnet_b0", 3, 32, 1280),  # classifier = Dropout, Linear
    ("convnext_tiny", 3, 32, 768),  # classifier = LayerNorm2d, Flatten, Linear
    ("mobilenet_v3_small", 3, 32, 1024), ("densenet121", 1, 32, 1024),
    ("vit_b_16", 3, 224, 768),  # heads.head
])
def test_backbones_build_and_give_features_of_the_head_input_dim(arch, in_channels, size, dim):
    model = build_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        images = torch.randn(2, in_channels, size, size)
        features = model.backbone(images)
        logits = model(images)
    assert features.shape == (2, dim) == (2, model.feature_dim)
    assert logits.shape == (2, 7)


def test_resnext_variants_that_torchvision_does_not_register():
    for arch, blocks in (("resnext101_32x4d", [3, 4, 23, 3]), ("resnext152_32x4d", [3, 8, 36, 3])):
        backbone = build_model(arch, num_classes=3).backbone
        assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == blocks
        conv2 = backbone.layer1[0].conv2
        assert conv2.groups == 32 and conv2.out_channels == 128  # 32 groups x 4 channels per group


def test_cifar_resnet32_has_three_stages_of_five_blocks_and_option_a_shortcuts():
    backbone = build_model("resnet32", num_classes=100).backbone
    assert len(backbone.stages) == 15
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31  # stem + 15 blocks x 2: no projection convolutions
    assert sum(p.numel() for p in backbone.parameters()) < 500_000


def test_trainable_groups_freeze_the_rest():
    model = build_model("resnet10", num_classes=3)
    chosen = select_trainable(model, "layer4,fc")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.layer4.", "fc.")) for n in trainable)
    assert len(chosen) == len(trainable)
    assert "fc.weight" in trainable and "backbone.layer3.0.conv1.weight" not in trainable
    with pytest.raises(LtcacheError, match="trainable='layer9' names no parameter; groups are: .*layer4"):
        select_trainable(model, "layer4,layer9")


def test_pretrained_needs_torchvision_weights():
    with pytest.raises(LtcacheError, match="no pretrained weights for 'resnet32'"):
        build_model("resnet32", num_classes=3, pretrained=True)


def test_resnet10_has_one_block_per_stage():
    model = build_model("resnet10", num_classes=3)
    assert [len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]


def test_unknown_backbone():
    with pytest.raises(LtcacheError, match="unknown backbone 'resnet9000'; did you mean"):
        build_model("resnet9000", 3)
