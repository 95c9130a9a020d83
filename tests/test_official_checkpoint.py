"""Official classifier-balancing checkpoints (final_model_checkpoint.pth: state_dict_best -> feat_model / classifier,
nn.DataParallel's `module.` prefixes) load into ltcache's models with the same logits, through extract and
train-backbone --init; keys that do not map are one-line errors naming them. The checkpoints here are fabricated
with the official layout: the feature model is torchvision's ResNet (the official ResNext class uses the same
module names: conv1, bn1, layer1..4 of BasicBlock / Bottleneck with conv/bn/downsample) without its fc, and the
classifier a module holding `fc`, both wrapped in nn.DataParallel as the official training does."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from conftest import assert_one_line_error, checksum, run_ltcache
from ltcache.core.errors import LtcacheError
from ltcache.stage1.checkpoint import OFFICIAL, load_weights_into, read_weights
from ltcache.stage1.models import build_model


class DotProductClassifier(nn.Module):  # the official classifier's layout: one nn.Linear named fc
    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.fc(x)


def official_networks(num_classes: int, in_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    features = ResNet(BasicBlock, [1, 1, 1, 1])  # ResNet-10
    features.fc = nn.Identity()
    if in_channels != 3:
        features.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    for module in features.modules():  # non-trivial BatchNorm statistics, so eval mode is really compared
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return nn.DataParallel(features), nn.DataParallel(DotProductClassifier(512, num_classes))


def save_official(path, features, classifier, **extra_networks):
    networks = {"feat_model": features.state_dict(), "classifier": classifier.state_dict(), **extra_networks}
    torch.save({"epoch": 90, "best_epoch": 87, "state_dict_best": networks, "best_acc": 0.5}, path)
    return path


def test_official_checkpoint_gives_the_same_logits(tmp_path):
    features, classifier = official_networks(7)
    path = save_official(tmp_path / "final_model_checkpoint.pth", features, classifier)
    assert all(key.startswith("module.") for key in features.state_dict())  # the official prefixes
    weights, about = read_weights(path)
    assert about == {"format": OFFICIAL, "arch": None, "epoch": 87}
    model = build_model("resnet10", 7)
    load_weights_into(model, weights, path, "resnet10")
    model.eval(), features.eval(), classifier.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(images), classifier(features(images)), atol=1e-5)
        assert torch.equal(model.fc.weight, classifier.module.fc.weight)


def test_official_keys_that_do_not_map_are_named(tmp_path):
    features, classifier = official_networks(7)
    extra = save_official(tmp_path / "a.pth", features, classifier, memory={"centroids": torch.zeros(2)})
    with pytest.raises(LtcacheError, match="network 'memory'"):
        read_weights(extra)
    state = features.state_dict()
    state["module.fc_add.weight"] = torch.zeros(512, 2048)  # the official use_fc option's layer
    torch.save({"state_dict_best": {"feat_model": state, "classifier": classifier.state_dict()}}, tmp_path / "b.pth")
    weights, _ = read_weights(tmp_path / "b.pth")
    with pytest.raises(LtcacheError, match="'backbone.fc_add.weight' has no place in a resnet10"):
        load_weights_into(build_model("resnet10", 7), weights, tmp_path / "b.pth", "resnet10")
    cosine = {"module.weight": torch.zeros(7, 512), "module.scale": torch.ones(1)}
    torch.save({"state_dict_best": {"feat_model": features.state_dict(), "classifier": cosine}}, tmp_path / "c.pth")
    with pytest.raises(LtcacheError, match="classifier key 'module.weight' does not map"):
        read_weights(tmp_path / "c.pth")
    torch.save({"state_dict_best": {"feat_model": features.state_dict()}}, tmp_path / "d.pth")
    with pytest.raises(LtcacheError, match="no 'classifier' network"):
        read_weights(tmp_path / "d.pth")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "e.pth")
    with pytest.raises(LtcacheError, match="neither an ltcache checkpoint nor a classifier-balancing one"):
        read_weights(tmp_path / "e.pth")
    torch.save({"state_dict_best": {"feat_model": features.state_dict(), "classifier": classifier.state_dict()},
                "args": nn.Linear(1, 1)}, tmp_path / "f.pth")  # a pickled module: refused by weights_only=True
    with pytest.raises(LtcacheError, match="pickled objects beyond tensors"):
        read_weights(tmp_path / "f.pth")


@pytest.mark.slow
def test_extract_and_init_read_an_official_checkpoint(tmp_path):
    features, classifier = official_networks(10, in_channels=1)  # digits-lt: 10 classes of 8x8 grey images
    path = save_official(tmp_path / "final_model_checkpoint.pth", features, classifier)
    before = checksum(tmp_path)
    assert_one_line_error(run_ltcache(["extract", path, "--out", tmp_path / "cache"], cwd=tmp_path),
                          ["records neither its dataset nor its architecture", "--dataset", "--backbone"])
    assert_one_line_error(run_ltcache(["train-backbone", "--init", path, "--out", tmp_path / "run"], cwd=tmp_path),
                          ["does not record its architecture", "--backbone"])
    assert_one_line_error(run_ltcache(["train-backbone", "--init", path, "--out", tmp_path / "run", "--backbone",
                                       "resnet32"], cwd=tmp_path), ["has no place in a resnet32"])
    assert checksum(tmp_path) == before
    made = run_ltcache(["extract", path, "--out", tmp_path / "cache", "--dataset", "digits-lt", "--backbone",
                        "resnet10"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["backbone"]["checkpoint_format"] == OFFICIAL and manifest["backbone"]["epoch"] == 87
    assert manifest["backbone"]["command"].startswith("ltcache extract")
    with h5py.File(tmp_path / "cache" / "head.h5") as head:
        assert np.array_equal(head["weight"][:], classifier.module.fc.weight.detach().numpy())
    tuned = run_ltcache(["train-backbone", "--init", path, "--backbone", "resnet10", "--dataset", "digits-lt",
                         "--epochs", "1", "--sampler", "class", "--trainable", "layer4,fc", "--out",
                         tmp_path / "run"], cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["init_format"] == OFFICIAL and len(config["init_sha256"]) == 64
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    frozen = features.module.state_dict()["layer1.0.conv1.weight"]
    assert torch.equal(state["backbone.layer1.0.conv1.weight"], frozen)  # not in --trainable: kept as loaded
    assert not torch.equal(state["fc.weight"], classifier.module.fc.weight)  # fine-tuned


def test_init_from_an_ltcache_checkpoint_starts_from_its_weights(digits_run, tmp_path):
    source = digits_run["run"] / "checkpoint.pt"
    result = run_ltcache(["train-backbone", "--init", source, "--dataset", "digits-lt", "--epochs", "1", "--lr",
                          "1e-9", "--out", tmp_path / "run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    before = torch.load(source, weights_only=True)["model"]
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert before.keys() == after.keys()
    weights = [key for key in before if key.endswith("weight")]
    assert all(torch.allclose(before[key], after[key], atol=1e-6) for key in weights)  # lr ~ 0: the start is kept
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["backbone"] == json.loads((digits_run["run"] / "config.json").read_text())["config"]["backbone"]
    assert config["init_format"] == "ltcache-checkpoint"
