"""extract's frontier options (issue 24): DINOv2's linear-protocol features of a timm ViT, CLIP's features before
its projection (alone, or with the projection kept for the zero-shot head), a timm model config for tiny custom
models, and test-time crops; each checked against the library's own forward."""

import json
import subprocess
import sys

import open_clip
import pytest
import timm
import torch

from conftest import TINY_CLIP, assert_clean_error, assert_one_line_error, checksum, invoke
from ltcache.cache import FeatureCache
from ltcache.data import DatasetSpec, build_dataset
from ltcache.lab import open_lab
from ltcache.stage1.hub import open_clip_preprocessing, timm_preprocessing
from ltcache.stage2 import fit_method

TINY_DINOV2 = {"architecture": "vit_small_patch14_reg4_dinov2",
               "kwargs": {"img_size": 28, "embed_dim": 48, "depth": 4, "num_heads": 3}}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / "tiny-dinov2.json").write_text(json.dumps(TINY_DINOV2))
    (folder / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    return folder


def digits(split: str):
    return build_dataset(DatasetSpec("digits-lt")).splits[split]


def test_dinov2_linear_features_are_the_class_and_mean_patch_tokens_of_timms_forward(tmp_path, configs):
    config = configs / "tiny-dinov2.json"
    for features, blocks in (("cls_patch", 1), ("cls4_patch", 4), ("cls", 1)):
        out = tmp_path / features
        result = invoke("extract", "--backbone", f"timm:{config}", "--features", features, "--dataset", "digits-lt",
                        "--out", out)
        assert result.exit_code == 0, result.output
        torch.manual_seed(0)  # extract's seed for random weights
        model = timm.create_model(TINY_DINOV2["architecture"], **TINY_DINOV2["kwargs"]).eval()
        model.reset_classifier(0)
        transform = timm_preprocessing(model).transform()  # extract's own transform, on the dataset's uint8 images
        images = torch.stack([transform(digits("test").images[i]) for i in (0, 5, 17)])
        with torch.inference_mode():
            # the blocks run by hand, each output normed (DINOv2's get_intermediate_layers(norm=True)): the class
            # token of the last `blocks`, then the mean of the last block's patch tokens (the 4 registers left out)
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            outputs = []
            for block in model.blocks:
                x = block(x)
                outputs.append(model.norm(x))
            parts = [out[:, 0] for out in outputs[-blocks:]]
            if features != "cls":
                parts.append(outputs[-1][:, 1 + 4:].mean(1))
            expected = torch.cat(parts, -1)
            if features == "cls_patch":  # and the same from timm's own forward_features
                tokens = model.forward_features(images)
                assert torch.allclose(torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1), expected, atol=1e-5)
        cache = FeatureCache(out)
        cached = cache.load_split("test").features[[0, 5, 17]]
        assert cached.shape[1] == 48 * (blocks + (features != "cls"))
        assert torch.allclose(cached, expected, atol=1e-4), (features, (cached - expected).abs().max())
        recorded = cache.manifest["backbone"]["model"]
        assert recorded["features"]["kind"] == features and recorded["model_config"]["sha256"]
        assert recorded["preprocessing"]["crop"] == [28, 28]  # the size the config built, not DINOv2's 518
    assert json.loads(invoke("info", tmp_path / "cls4_patch", "--json").stdout)["features"] == "cls4_patch"


def test_clip_pre_projection_features_are_the_tower_without_its_projection(tmp_path, configs):
    config = configs / "tiny-clip.json"
    common = ("--dataset", "digits-lt", "--templates", "simple")
    for features in ("projected", "pre_projection", "both"):
        extra = ("--zero-shot",) if features != "pre_projection" else ()
        result = invoke("extract", "--backbone", f"open_clip:{config}", "--features", features, *extra, *common,
                        "--out", tmp_path / features)
        assert result.exit_code == 0, result.output
    projected, pre, both = (FeatureCache(tmp_path / name) for name in ("projected", "pre_projection", "both"))
    assert projected.feature_dim == 32 and pre.feature_dim == both.feature_dim == 64
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-clip").eval()
    projection = reference.visual.proj.detach().clone()
    reference.visual.proj = None  # the tower with its projection removed
    transform = open_clip_preprocessing("tiny-clip", None).transform()
    images = torch.stack([transform(digits("test").images[i]) for i in (0, 9)])
    cached_pre = pre.load_split("test").features
    with torch.inference_mode():
        assert torch.allclose(cached_pre[[0, 9]], reference.visual(images), atol=1e-4)
    assert torch.allclose(both.load_split("test").features, cached_pre)  # the same features...
    text = both.text_head()  # ...with the projection kept beside the text head
    assert torch.allclose(text.projection, projection, atol=1e-6)
    assert torch.allclose(cached_pre @ projection, projected.load_split("test").features, atol=1e-4)
    # the zero-shot head on the pre-projection cache is the projected cache's, logit for logit
    assert torch.allclose(text.logits(cached_pre), projected.text_head().logits(projected.load_split("test").features),
                          atol=1e-3)
    lab_both, lab_projected = open_lab(tmp_path / "both"), open_lab(tmp_path / "projected")
    ours = lab_both.score(fit_method("zero_shot", lab_both.data)).accuracy
    theirs = lab_projected.score(fit_method("zero_shot", lab_projected.data)).accuracy
    assert ours.mean_per_class == theirs.mean_per_class and ours.all == theirs.all
    # the joint head differs (a probe on 64-d against 32-d features), so gla's rows may; it runs on the text head
    assert fit_method("gla", lab_both.data).head.projection is not None
    info = json.loads(invoke("info", tmp_path / "both", "--json").stdout)
    assert info["features"] == "both" and info["zero_shot_head"]


def test_bad_feature_options_are_one_line_errors_and_write_nothing(tmp_path, configs, toy_cache):
    clip = f"open_clip:{configs / 'tiny-clip.json'}"
    bad = {"syntax.json": "{not json", "extra.json": json.dumps({**TINY_DINOV2, "weights": "x"}),
           "unknown.json": json.dumps({"architecture": "vit_tiny_nosuch", "kwargs": {}}),
           "negative.json": json.dumps({**TINY_DINOV2, "kwargs": {**TINY_DINOV2["kwargs"], "depth": -2}}),
           "huge.json": json.dumps({**TINY_DINOV2, "kwargs": {"embed_dim": 1 << 20, "depth": 1 << 10}}),
           "nan.json": '{"architecture": "vit_small_patch14_dinov2", "kwargs": {"init_values": NaN}}',
           "wrongkw.json": json.dumps({**TINY_DINOV2, "kwargs": {"no_such_option": 3}})}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    before, cache_before = checksum(tmp_path), checksum(toy_cache)
    out = ("--dataset", "digits-lt", "--out", tmp_path / "a")
    cases = [
        (("--backbone", "resnet18", "--features", "cls"), "reads a timm ViT's tokens"),
        (("--backbone", clip, "--features", "cls_patch"), "reads a timm ViT's tokens"),
        (("--backbone", "timm:test_resnet", "--features", "both"), "is for CLIP image towers"),
        (("--backbone", "timm:test_vit2", "--features", "cls_patch"), "needs a ViT with a class token"),
        (("--backbone", "timm:test_vit", "--features", "cls_patch", "--joint-head", "own"), "--joint-head probe"),
        (("--backbone", clip, "--features", "both"), "add --zero-shot"),
        (("--backbone", clip, "--features", "pre_projection", "--zero-shot"), "use --features both"),
        (("--backbone", "timm:test_vit", "--features", "nonsense"), "--features"),
        (("--backbone", f"timm:{tmp_path / 'missing.json'}"), "does not exist"),
        (("--backbone", f"timm:{tmp_path / 'syntax.json'}"), "is not valid JSON"),
        (("--backbone", f"timm:{tmp_path / 'extra.json'}"), "nothing else"),
        (("--backbone", f"timm:{tmp_path / 'unknown.json'}"), "unknown timm model 'vit_tiny_nosuch'"),
        (("--backbone", f"timm:{tmp_path / 'negative.json'}"), "kwargs.depth = -2"),
        (("--backbone", f"timm:{tmp_path / 'huge.json'}"), "more than 10^10"),
        (("--backbone", f"timm:{tmp_path / 'nan.json'}"), "finite"),
        (("--backbone", f"timm:{tmp_path / 'wrongkw.json'}"), "timm cannot build"),
        (("--backbone", f"timm:{configs / 'tiny-dinov2.json'}", "--pretrained"), "drop --pretrained"),
    ]
    for args, message in cases:
        assert_clean_error(invoke("extract", *args, *out), message)
    run = subprocess.run([sys.executable, "-m", "ltcache", "extract", "--backbone", "resnet18", "--features",
                          "cls_patch", "--dataset", "digits-lt", "--out", str(tmp_path / "b")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert_one_line_error(run, ["--features cls_patch reads a timm ViT's tokens"])
    assert checksum(tmp_path) == before and checksum(toy_cache) == cache_before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------- test-time crops


def test_ten_crops_are_torchvisions_ten_crops_of_the_enlarged_image(tmp_path, configs):
    from torchvision.transforms import v2
    from torchvision.transforms.functional import ten_crop

    out = tmp_path / "crops"
    result = invoke("extract", "--backbone", f"timm:{configs / 'tiny-dinov2.json'}", "--features", "cls",
                    "--test-crops", "10", "--crop-expand", "8", "--dataset", "digits-lt", "--out", out)
    assert result.exit_code == 0, result.output
    cache = FeatureCache(out)
    assert cache.manifest["test_crops"]["geometry"] == "tencrop" and cache.manifest["test_crops"]["resize"] == 36
    crops, test = cache.load_split("test_crops"), cache.load_split("test")
    assert len(crops) == 10 * len(test) and torch.equal(crops.labels, test.labels.repeat(10))
    assert cache.manifest["splits"]["val_crops"]["views"] == 10 and cache.manifest["splits"]["val_crops"]["of"] == "val"
    torch.manual_seed(0)
    model = timm.create_model(TINY_DINOV2["architecture"], **TINY_DINOV2["kwargs"]).eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    image = digits("test").images[7].expand(3, 8, 8)
    enlarged = v2.Resize(36, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(image)
    views = torch.stack([v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(crop))
                         for crop in ten_crop(enlarged, [28, 28])])
    with torch.inference_mode():
        expected = model.forward_features(views)[:, 0]
    ours = crops.features[torch.arange(10) * len(test) + 7]  # row k * n + i: crop k of image i
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_tta_averages_the_logits_of_the_crops_and_equals_one_view_when_the_crops_are_the_view(tmp_path, configs):
    backbone = f"timm:{configs / 'tiny-dinov2.json'}"
    same, flip = tmp_path / "same", tmp_path / "flip"
    for out, crops in ((same, ("--test-crops", "5", "--crop-expand", "0")), (flip, ("--test-crops", "2"))):
        result = invoke("extract", "--backbone", backbone, "--features", "cls_patch", *crops, "--dataset",
                        "digits-lt", "--out", out)
        assert result.exit_code == 0, result.output
    # crop size + 0 pixels: every one of the five crops is the test view itself, so TTA changes nothing
    lab = open_lab(same, tta=True)
    comparison = lab.compare(["joint", "knn"], bootstrap=0, tta=True)
    for row in comparison.rows:
        assert row.tta.as_dict() == row.evaluation.accuracy.as_dict() and row.crops == 5
    # the view and its mirror: the mean of the two logit matrices, by hand
    lab = open_lab(flip, tta=True)
    features = FeatureCache(flip).load_split("test_crops").features
    assert torch.allclose(features[: len(lab.test)], lab.test.features)
    mirror = features[len(lab.test):]
    head = fit_method("crt", lab.data, {"min_steps": 50})
    mean = (head.head.logits(lab.test.features) + head.head.logits(mirror)) / 2
    ensembled = lab.tta_accuracy(head.head)
    labels = lab.test.labels
    assert ensembled.all == pytest.approx(100.0 * (mean.argmax(1) == labels).float().mean().item())
    assert ensembled.top5 == pytest.approx(100.0 * (mean.topk(5, 1).indices == labels[:, None]).any(1).float()
                                           .mean().item())
    result = invoke("compare", flip, "--methods", "joint,crt", "--tta", "--bootstrap", "0", "--set",
                    "crt.min_steps=50", "--out", tmp_path / "results")
    assert result.exit_code == 0, result.output
    assert "All, 2 crops" in result.output
    rows = json.loads((tmp_path / "results" / "reports" / "results.json").read_text())["rows"]
    assert all(row["tta"]["crops"] == 2 for row in rows)
    csv_header = (tmp_path / "results" / "reports" / "results.csv").read_text().splitlines()[0]
    assert "tta_mean_per_class" in csv_header and "tta_crops" in csv_header
    report = invoke("report", tmp_path / "results", "--out", tmp_path / "page")
    assert report.exit_code == 0, report.output
    assert "crt (2 crops)" in (tmp_path / "page" / "results.md").read_text()


def test_bad_crop_options_are_one_line_errors_and_write_nothing(tmp_path, configs, toy_cache, digits_run):
    before, cache_before = checksum(tmp_path), checksum(toy_cache)
    out = ("--dataset", "digits-lt", "--out", tmp_path / "a")
    backbone = ("--backbone", f"timm:{configs / 'tiny-dinov2.json'}")
    assert_clean_error(invoke("extract", *backbone, "--test-crops", "3", *out), "--test-crops 3", "2 (the view")
    checkpoint = digits_run["run"] / "checkpoint.pt"
    assert_clean_error(invoke("extract", checkpoint, "--test-crops", "5", "--out", tmp_path / "a"), "--test-crops 2")
    assert_clean_error(invoke("compare", toy_cache, "--tta", "--bootstrap", "0"), "--tta needs test crops",
                       "--test-crops K")
    assert checksum(tmp_path) == before and checksum(toy_cache) == cache_before and not (tmp_path / "a").exists()


def test_a_damaged_tta_entry_in_results_json_is_refused(tmp_path):
    from ltcache.core.errors import LtcacheError
    from ltcache.report.inputs import read_results_json

    row = {"method": "crt", "many": 1.0, "medium": 2.0, "few": 3.0, "all": 4.0, "chosen": {}}
    for bad in ({"crops": 0, "many": 1.0, "medium": 1.0, "few": 1.0, "all": 1.0}, {"crops": 2, "all": "x"},
                {"crops": True, "many": 1.0, "medium": 1.0, "few": 1.0, "all": 1.0}, [1, 2], "tta"):
        file = tmp_path / "results.json"
        file.write_text(json.dumps({"rows": [{**row, "tta": bad}]}))
        with pytest.raises(LtcacheError, match="'tta' must hold"):
            read_results_json(file)
