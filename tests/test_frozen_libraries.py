"""Frozen backbones from timm and open_clip (extract --backbone timm:NAME / open_clip:ARCH/TAG), tiny models with
random weights (nothing is downloaded), checked against the libraries' own transforms, towers and tokenizer; the
zero-shot text head and the heads that use it (zero_shot, zs_ensemble, gla)."""

import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_CLIP, assert_clean_error, assert_one_line_error, checksum, invoke, lab_data, toy_steps
from ltcache.cache import FeatureCache
from ltcache.data import DatasetSpec, build_dataset
from ltcache.heads import LinearCosineHead, LinearHead
from ltcache.stage1.hub import choose_joint_head, open_clip_preprocessing, timm_preprocessing
from ltcache.stage2 import fit_method
from ltcache.stage2.methods.foundation import estimate_label_bias


def digit_image(index: int) -> tuple[torch.Tensor, Image.Image]:
    """Test image `index` of digits-lt as the dataset gives it (uint8 [1, 8, 8]) and as a grayscale PIL image."""
    images = build_dataset(DatasetSpec("digits-lt")).splits["test"].images
    return images[index], Image.fromarray(images[index][0].numpy(), mode="L")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    out = folder / "cache"
    result = invoke("extract", "--backbone", f"open_clip:{config}", "--zero-shot", "--templates", "simple",
                    "--dataset", "digits-lt", "--out", out)
    assert result.exit_code == 0, result.output
    return {"config": config, "cache": out}


def test_a_timm_backbone_is_extracted_with_timm_features_and_preprocessing_then_every_method_runs(tmp_path):
    result = invoke("extract", "--backbone", "timm:test_resnet", "--dataset", "digits-lt", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    model = manifest["backbone"]["model"]
    assert model["library"] == "timm" and model["name"] == "test_resnet" and model["weights"] is None
    assert model["timm_version"] == timm.__version__
    assert model["preprocessing"]["crop"] == [160, 160] and model["preprocessing"]["resize"] == 168  # 160 / 0.95
    assert model["joint_head"]["choice"] == "linear probe (random weights)"
    assert "zero_shot_head.h5" not in manifest["files"]
    # The cached features are timm's own: the same random weights (seed 0), timm's own transform of the image.
    torch.manual_seed(0)
    reference = timm.create_model("test_resnet").eval()
    reference.reset_classifier(0)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(reference))
    cached = FeatureCache(tmp_path / "c").load_split("test").features
    for index in (0, 17):
        with torch.inference_mode():
            expected = reference(transform(digit_image(index)[1].convert("RGB"))[None])[0]
        assert F.cosine_similarity(cached[index], expected, dim=0) > 0.999
    compared = invoke("compare", tmp_path / "c", "--methods", "all", "--bootstrap", "0", "--json", *toy_steps())
    assert compared.exit_code == 0, compared.output
    methods = {row["method"] for row in json.loads(compared.stdout)["rows"]}
    assert {"joint", "crt", "lws", "tau_norm", "gda", "cos_la"} <= methods
    assert not methods & {"zero_shot", "zs_ensemble", "gla"}  # no text head: they sit out of --methods all


def test_the_preprocessing_comes_from_the_timm_and_open_clip_configs():
    vit = timm.create_model("test_vit")  # random weights: its pretrained config comes with it, nothing downloaded
    ours = timm_preprocessing(vit)
    assert ours.crop == (160, 160) and ours.resize == 168 and ours.interpolation == "bicubic"
    assert ours.mean == (0.5, 0.5, 0.5) and ours.std == (0.5, 0.5, 0.5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    reference = timm.data.create_transform(**timm.data.resolve_model_data_config(vit))
    difference = (ours.transform()(image) - reference(image)).abs()
    assert difference.max() <= 1.01 / 255 / 0.5 and difference.mean() < 1e-3  # at most one level of rounding
    clip = open_clip_preprocessing("ViT-B-16", "openai")  # from the configs alone: no model, no download
    assert clip.crop == (224, 224) and clip.resize == 224 and clip.interpolation == "bicubic"
    assert clip.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and not clip.squash
    reference = open_clip.image_transform(224, is_train=False, mean=clip.mean, std=clip.std,
                                          interpolation="bicubic", resize_mode="shortest")
    difference = (clip.transform()(image) - reference(image)).abs()
    assert difference.max() <= 1.01 / 255 / min(clip.std) and difference.mean() < 1e-3
    assert open_clip_preprocessing("ViT-SO400M-14-SigLIP", "webli").squash  # SigLIP's squash resize


def test_the_open_clip_text_head_is_the_models_own_zero_shot_classifier(tiny_clip):
    cache = FeatureCache(tiny_clip["cache"])
    model = cache.manifest["backbone"]["model"]
    assert model["library"] == "open_clip" and model["name"] == "tiny-clip" and model["weights"] is None
    assert model["zero_shot"]["templates"] == "simple" and model["zero_shot"]["prompts"] == 7
    assert model["zero_shot"]["class_names"] == "the dataset's class names"
    assert "zero_shot_head.h5" in cache.manifest["files"]
    summary = json.loads(invoke("info", tiny_clip["cache"], "--json").stdout)
    assert summary["zero_shot_head"] is True and summary["weights"] is None
    # The same random towers (seed 0), encoded by hand with open_clip's own tokenizer.
    open_clip.add_model_config(tiny_clip["config"])
    torch.manual_seed(0)
    reference = open_clip.create_model("tiny-clip").eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    expected = []
    with torch.inference_mode():
        for name in cache.class_names:
            prompts = [template(name) for template in open_clip.SIMPLE_IMAGENET_TEMPLATES]
            text = F.normalize(reference.encode_text(tokenizer(prompts)), dim=-1).mean(0)
            expected.append(F.normalize(text, dim=0) * reference.logit_scale.exp())
        head = cache.text_head()
        assert head.normalize_input and torch.allclose(head.weight, torch.stack(expected), atol=1e-4)
        preprocess = open_clip.image_transform(32, is_train=False)
        image = digit_image(5)[1]
        features = reference.encode_image(preprocess(image)[None])[0]
    assert F.cosine_similarity(cache.load_split("test").features[5], features, dim=0) > 0.999


def test_zero_shot_zs_ensemble_and_gla_run_on_the_text_head(tiny_clip):
    result = invoke("compare", tiny_clip["cache"], "--methods", "zero_shot,zs_ensemble,gla", "--bootstrap", "0",
                    "--json", "--out", tiny_clip["cache"].parent / "results")
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.stdout)["rows"]}
    cache = FeatureCache(tiny_clip["cache"])
    test = cache.load_split("test")
    predictions = (F.normalize(test.features, dim=1) @ cache.text_head().weight.T).argmax(1)
    per_class = [(predictions[test.labels == c] == c).float().mean().item() for c in range(cache.num_classes)]
    assert rows["zero_shot"]["mean_per_class"] == pytest.approx(100 * np.mean(per_class), abs=0.01)
    # The heads compare saved are the text head, the chosen mix, and GLA's formula, on the cache's own tensors.
    heads = tiny_clip["cache"].parent / "results" / "heads"
    text, (weight, bias) = cache.text_head(), cache.joint_head()
    assert torch.equal(cache.load_head("zero_shot", folder=heads)[0].weight, text.weight)
    joint, zero_shot = test.features @ weight.T + bias, text.logits(test.features)
    alpha = rows["zs_ensemble"]["chosen"]["alpha"]
    mixed = cache.load_head("zs_ensemble", folder=heads)[0].logits(test.features)
    assert alpha in [k / 10 for k in range(11)]
    assert torch.allclose(mixed, (1 - alpha) * joint + alpha * zero_shot, atol=1e-4)
    assert torch.allclose(cache.load_head("gla", folder=heads)[0].logits(test.features),
                          gla_formula(cache, rows["gla"]["chosen"], test.features), atol=1e-3)


def gla_formula(cache, chosen, features):
    """GLA's head from its recorded temperatures: joint / T_joint - log(train prior) + zero-shot / T_zs - log q, with
    log q estimated on the calibrated zero-shot logits of val (a balanced split)."""
    val, text = cache.load_split("val"), cache.text_head()
    weight, bias = cache.joint_head()
    counts = torch.as_tensor(cache.class_counts, dtype=torch.float32)
    t_joint, t_text = chosen["temperature_joint"], chosen["temperature_zero_shot"]
    val_counts = torch.bincount(val.labels, minlength=len(counts)).numpy()
    log_q, _, _ = estimate_label_bias(text.logits(val.features) / t_text, val.labels, val_counts)
    return ((features @ weight.T + bias) / t_joint - torch.log(counts / counts.sum()) + text.logits(features) / t_text
            - log_q)


def test_gla_recovers_the_label_bias_a_zero_shot_model_carries():
    # Zero-shot logits z = log p(x | y) + log pi_p of Gaussian classes; labelled rows drawn with another prior
    # pi_s. The estimate of log pi_p is exact up to sampling noise (0.057 at 40k rows, 0.016 at 400k: 1 / sqrt(n)).
    generator = torch.Generator().manual_seed(0)
    classes, rows = 5, 400000
    centers = 2.0 * torch.randn(classes, 3, generator=generator)
    train_prior = torch.tensor([0.5, 0.25, 0.12, 0.08, 0.05])
    pretrain_prior = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    labels = torch.multinomial(train_prior, rows, replacement=True, generator=generator)
    features = centers[labels] + torch.randn(rows, 3, generator=generator)
    zero_shot = -0.5 * torch.cdist(features, centers).pow(2) + pretrain_prior.log()
    counts = torch.bincount(labels, minlength=classes)
    estimate, evaluations, _ = estimate_label_bias(zero_shot, labels, counts.numpy())
    assert torch.allclose(estimate.exp().sum(), torch.tensor(1.0))
    assert (estimate - pretrain_prior.log()).abs().max() < 0.03, (estimate.exp(), evaluations)  # 0.016 seen
    # At the optimum, the adjusted model's mean probability of each class is the train frequency.
    mean_probability = torch.softmax(zero_shot - estimate + (counts / rows).log(), 1).mean(0)
    assert torch.allclose(mean_probability, counts / rows, atol=1e-4)


def toy_text_data(seed: int = 0):
    """A 3-class LabData whose text head and joint head disagree: each is right on different classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(torch.tensor([60, 20, 6]))
    features = torch.eye(3)[labels] * 2 + 0.7 * torch.randn(len(labels), 3, generator=generator)
    val_labels = torch.arange(3).repeat_interleave(20)
    val = torch.eye(3)[val_labels] * 2 + 0.7 * torch.randn(60, 3, generator=generator)
    from ltcache.cache import Split

    data = lab_data(torch.eye(3) * torch.tensor([[3.0], [1.0], [0.3]]), torch.tensor([1.0, 0.0, -0.5]), features,
                    labels, [60, 20, 6], val=Split(val, val_labels))
    data.text = LinearHead(10 * torch.eye(3) + 2 * torch.randn(3, 3, generator=generator), None,
                           normalize_input=True)
    return data


def test_zs_ensemble_is_the_chosen_mix_of_the_joint_and_text_logits():
    data = toy_text_data()
    fitted = fit_method("zs_ensemble", data)
    features = data.val.features
    joint, text = data.joint.logits(features), data.text.logits(features)
    best = max((data.score(((1 - a) * joint + a * text).argmax(1), "val")["mean_per_class"], -a)
                for a in [k / 10 for k in range(11)])
    assert fitted.chosen["alpha"] == pytest.approx(-best[1])
    alpha = fitted.chosen["alpha"]
    assert torch.allclose(fitted.head.logits(features), (1 - alpha) * joint + alpha * text, atol=1e-5)
    ends = [fit_method("zs_ensemble", data, {"alphas": [a]}).head.logits(features) for a in (0.0, 1.0)]
    assert torch.allclose(ends[0], joint, atol=1e-5) and torch.allclose(ends[1], text, atol=1e-5)
    gla = fit_method("gla", data, {"calibrate": False, "estimate_on": "train"})  # the earlier, uncalibrated form
    train_log_prior = torch.log(torch.tensor([60.0, 20.0, 6.0]) / 86)
    estimate, _, _ = estimate_label_bias(data.text.logits(data.train.features), data.train.labels, [60, 20, 6])
    expected = joint - train_log_prior + text - estimate
    assert torch.allclose(gla.head.logits(features), expected, atol=1e-4)


def test_a_linear_cosine_head_is_stored_and_reloaded(toy_cache):
    generator = torch.Generator().manual_seed(0)
    head = LinearCosineHead(torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator),
                            torch.randn(3, generator=generator))
    cache = FeatureCache(toy_cache)
    cache.save_head("mix", head, {"alpha": 0.5})
    loaded, attrs = cache.load_head("mix")
    features = torch.randn(7, 4, generator=generator)
    expected = features @ head.weight.T + head.bias + F.normalize(features, dim=1) @ head.cosine_weight.T
    assert isinstance(loaded, LinearCosineHead) and attrs == {"alpha": 0.5}
    assert torch.allclose(loaded.logits(features), expected, atol=1e-5)


def test_the_joint_head_is_the_models_own_only_when_its_classes_are_the_datasets(tmp_path, monkeypatch):
    names = [str(k) for k in range(10)]
    own = (torch.randn(10, 4), torch.randn(10))
    assert choose_joint_head("auto", own, names, names, True, "b", 10)[0]
    assert not choose_joint_head("auto", own, names[::-1], names, True, "b", 10)[0]  # other classes, or order
    assert not choose_joint_head("auto", own, names, names, False, "b", 10)[0]  # random weights
    assert choose_joint_head("own", own, None, names, False, "b", 10)[0]
    # End to end: a timm model whose classifier has the dataset's 10 classes keeps it under --joint-head own.
    import ltcache.stage1.hub as hub

    real = hub.timm_model

    def with_ten_classes(name, pretrained, features="auto"):
        features, dim, _, _, preprocessing = real(name, pretrained, features)
        weight, bias = torch.randn(10, dim), torch.randn(10)
        return features, dim, (weight, bias), None, preprocessing

    monkeypatch.setattr(hub, "timm_model", with_ten_classes)
    result = invoke("extract", "--backbone", "timm:test_resnet", "--joint-head", "own", "--dataset", "digits-lt",
                    "--out", tmp_path / "own")
    assert result.exit_code == 0, result.output
    cache = FeatureCache(tmp_path / "own")
    weight, bias = cache.joint_head()
    torch.manual_seed(0)  # what the patched builder drew after the seeded model: rebuild it to compare
    real("test_resnet", False)
    assert torch.allclose(weight, torch.randn(10, weight.shape[1])) and torch.allclose(bias, torch.randn(10))
    assert cache.manifest["backbone"]["model"]["joint_head"] == {"source": "own classifier (--joint-head own)"}


def test_bad_frozen_extracts_are_one_line_errors_and_write_nothing(tmp_path, tiny_clip, toy_cache):
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a thing\n")
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    before, cache_before = checksum(tmp_path), checksum(toy_cache)
    config = f"open_clip:{tiny_clip['config']}"
    out = ("--dataset", "digits-lt", "--out", tmp_path / "a")
    cases = [
        (("--backbone", "timm:test_resnett"), "unknown timm model 'test_resnett'; did you mean test_resnet"),
        (("--backbone", "timm:"), "names no model"),
        (("--backbone", "keras:resnet"), "unknown backbone library 'keras'"),
        (("--backbone", "timm:test_resnet", "--zero-shot"), "--zero-shot needs a CLIP backbone"),
        (("--backbone", "timm:test_resnet", "--joint-head", "own"), "classifier has 1000 outputs"),
        (("--backbone", "timm:test_resnet", "--train-views", "2"), "drop --train-views"),
        (("--backbone", "open_clip:ViT-B-16", "--pretrained"), "--pretrained needs a tag"),
        (("--backbone", "open_clip:ViT-B-16/nosuchtag"), "no pretrained tag 'nosuchtag'"),
        (("--backbone", f"open_clip:{tmp_path / 'missing.json'}"), "does not exist"),
        (("--backbone", config, "--joint-head", "own"), "no classifier of its own"),
        (("--backbone", config, "--zero-shot", "--templates", templates), "exactly one {}"),
        (("--backbone", config, "--zero-shot", "--class-names", names), "has 2 names for 10 classes"),
        (("--backbone", config, "--zero-shot", "--class-names", tmp_path / "none.txt"), "none.txt not found"),
    ]
    for args, message in cases:
        assert_clean_error(invoke("extract", *args, *out), message)
    assert_clean_error(invoke("compare", toy_cache, "--methods", "gla", "--bootstrap", "0"),
                       "needs CLIP's zero-shot text head", "--zero-shot")
    assert checksum(tmp_path) == before and checksum(toy_cache) == cache_before and not (tmp_path / "a").exists()


def test_a_failed_weight_download_is_a_one_line_error(tmp_path):
    # The hub offline, as on a machine without network: timm's download fails at once, inside the library.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = checksum(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ltcache", "extract", "--backbone", "timm:test_resnet",
                             "--pretrained", "--dataset", "digits-lt", "--out", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert_one_line_error(result, ["could not load the pretrained weights of timm:test_resnet", "HF_HOME"])
    assert checksum(tmp_path) == before


def test_a_changed_text_head_is_refused(tiny_clip, tmp_path):
    import shutil

    cache = shutil.copytree(tiny_clip["cache"], tmp_path / "c")
    with open(cache / "zero_shot_head.h5", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    assert_clean_error(invoke("compare", cache, "--methods", "zero_shot", "--bootstrap", "0"),
                       "zero_shot_head.h5 fails its sha256 check")
    info = invoke("info", cache, "--verify", "--json")
    assert "zero_shot_head.h5" in json.loads(info.stdout)["corrupt_files"]
