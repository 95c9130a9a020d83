"""extract without a checkpoint: a backbone as it is (random weights here; torchvision's pretrained weights are a
download on the user's side and stay untested), the joint head a linear probe, the provenance in the manifest."""

import json

import torch

from conftest import assert_clean_error, checksum, invoke, toy_steps
from ltcache.cache import FeatureCache
from ltcache.stage1.models import pretrained_preprocessing


def test_extract_a_backbone_without_a_checkpoint_then_compare_every_method(tmp_path):
    result = invoke("extract", "--backbone", "smallresnet8", "--dataset", "digits-lt", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    backbone = manifest["backbone"]
    assert backbone["checkpoint"] is None and backbone["checkpoint_sha256"] is None
    model = backbone["model"]
    assert model["library"] == "ltcache" and model["name"] == "smallresnet8" and model["weights"] is None
    assert model["preprocessing"] == "the dataset's test-time transform"
    assert model["joint_head"]["source"] == "fitted: instance-balanced linear probe"
    assert model["joint_head"]["choice"] == "linear probe (random weights)"
    cache = FeatureCache(tmp_path / "c")
    weight, bias = cache.joint_head()
    train = cache.load_split("train")
    predictions = (train.features @ weight.T + bias).argmax(1)
    majority = torch.bincount(train.labels).max().item() / len(train.labels)
    assert (predictions == train.labels).float().mean().item() > majority  # the probe learned more than the prior
    compared = invoke("compare", tmp_path / "c", "--methods", "all", "--bootstrap", "0", "--json", *toy_steps())
    assert compared.exit_code == 0, compared.output
    rows = json.loads(compared.stdout)["rows"]
    assert {"gda", "cos_la", "crt", "lws", "tau_norm"} <= {row["method"] for row in rows}


def test_the_preprocessing_of_torchvision_weights_comes_from_their_metadata():
    import torchvision

    ours = pretrained_preprocessing("resnet18")  # metadata only: nothing is downloaded
    assert ours.crop == (224, 224) and ours.resize == 256 and ours.interpolation == "bilinear"
    assert ours.mean == (0.485, 0.456, 0.406) and ours.std == (0.229, 0.224, 0.225)
    vit = pretrained_preprocessing("vit_b_16")
    assert vit.crop == (224, 224) and vit.resize == 256
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    reference = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
    assert (ours.transform()(image) - reference(image)).abs().max() <= 1.01 / 255 / 0.224  # one level of rounding
    gray = ours.transform()(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8))  # grayscale becomes RGB
    assert tuple(gray.shape) == (3, 224, 224)
    assert torch.allclose(gray[0] * 0.229 + 0.485, gray[1] * 0.224 + 0.456, atol=1e-5)


def test_bad_no_checkpoint_extracts_are_one_line_errors_and_write_nothing(tmp_path, digits_run):
    before = checksum(tmp_path)
    cases = [
        (("extract", "--dataset", "digits-lt", "--out", tmp_path / "a"), "pass --backbone and --dataset"),
        (("extract", "--backbone", "smallresnet8", "--out", tmp_path / "a"), "pass --backbone and --dataset"),
        (("extract", "--backbone", "smallresnet8", "--pretrained", "--dataset", "digits-lt", "--out", tmp_path / "a"),
         "has no pretrained weights"),
        (("extract", digits_run["run"] / "checkpoint.pt", "--pretrained", "--out", tmp_path / "a"),
         "drop --pretrained"),
    ]
    for args, message in cases:
        assert_clean_error(invoke(*args), message)
    assert checksum(tmp_path) == before and not (tmp_path / "a").exists()
