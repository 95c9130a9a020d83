"""Backbones from model libraries, extracted as they are: torchvision's pretrained weights, `timm:<name>` and
`open_clip:<arch>/<tag>` (CLIP image towers, with a zero-shot text head).

timm and open_clip_torch are optional extras (`pip install 'ltcache[timm]'`, `pip install 'ltcache[open_clip]'`);
they are imported only when such a backbone is named. Every backbone's preprocessing (resolution, resize, crop,
interpolation, mean, std) comes from its library's own config, and is built here as one torchvision transform that
takes the dataset's images as they come (PIL images or uint8 tensors) and replicates a grayscale channel to RGB.

Weights are downloaded by the library (to its own cache) the first time a pretrained backbone is used; ltcache
itself downloads nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ltcache.core.errors import LtcacheError, unknown_name
from ltcache.core.fsutil import read_class_names, read_lines
from ltcache.stage1.config import FEATURE_KINDS
from ltcache.stage1.preprocessing import Preprocessing, ToRGB  # noqa: F401  (re-exported)

LIBRARIES = {"timm": ("timm", "timm"), "open_clip": ("open_clip", "open_clip")}  # prefix -> (module, extra)


def split_name(backbone: str) -> tuple[str | None, str]:
    """('timm', 'vit_small_patch16_224') for 'timm:vit_small_patch16_224'; (None, name) for torchvision / ltcache."""
    prefix, colon, rest = backbone.partition(":")
    if not colon:
        return None, backbone
    if prefix not in LIBRARIES:
        raise LtcacheError(f"unknown backbone library {prefix!r} in {backbone!r}; use timm:<name>, "
                           "open_clip:<arch>/<tag>, or a torchvision model name")
    if not rest:
        raise LtcacheError(f"{backbone!r} names no model; e.g. timm:vit_small_patch16_224 or "
                           "open_clip:ViT-B-16/openai")
    return prefix, rest


def import_library(prefix: str):
    """The library module, or a one-line error naming the extra to install."""
    import importlib

    module, extra = LIBRARIES[prefix]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LtcacheError(f"{prefix}: backbones need the {extra} extra; pip install 'ltcache[{extra}]'") from None


@contextlib.contextmanager
def loading_weights(backbone: str, pretrained: bool):
    """A failed weight download or load (no network, a partial file in the library's cache) becomes a one-line
    error naming the backbone; without `pretrained` nothing is fetched and errors pass through."""
    if not pretrained:
        yield
        return
    try:
        yield
    except LtcacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - the libraries raise their own (requests, huggingface_hub, urllib) errors
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise LtcacheError(f"could not load the pretrained weights of {backbone} ({type(exc).__name__}: {reason}); "
                           "check the network, or the library's download cache (TORCH_HOME, HF_HOME)") from None


# ---------------------------------------------------------------------------------------------------------- timm


TIMM_TOKEN_FEATURES = {"cls": (1, False), "cls_patch": (1, True), "cls4_patch": (4, True)}  # (blocks, patch mean)
CLIP_FEATURES = ("projected", "pre_projection", "both")
FEATURES = FEATURE_KINDS  # every kind, with what it is (stage1/config.py owns the list)


class TimmFeatures(nn.Module):
    """A timm model's pre-logits features: forward_head(forward_features(x), pre_logits=True), the input of its
    classifier (pooled, after any head norm)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class TimmTokenFeatures(nn.Module):
    """DINOv2's linear-protocol feature from a timm ViT (dinov2/eval/linear.py, create_linear_input): the class tokens
    of the last `blocks` blocks, each after the final norm, then (`patch_mean`) the mean of the last block's patch
    tokens (registers and other prefix tokens left out), concatenated."""

    def __init__(self, model: nn.Module, blocks: int, patch_mean: bool):
        super().__init__()
        self.model, self.blocks, self.patch_mean = model, blocks, patch_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks == 1:
            tokens = self.model.forward_features(x)  # the last block's tokens after the final norm
            layers = [(tokens[:, self.model.num_prefix_tokens:], tokens[:, : self.model.num_prefix_tokens])]
        else:
            layers = self.model.forward_intermediates(x, indices=self.blocks, norm=True, output_fmt="NLC",
                                                      intermediates_only=True, return_prefix_tokens=True)
        parts = [prefix[:, 0] for _, prefix in layers]
        if self.patch_mean:
            parts.append(layers[-1][0].mean(1))
        return torch.cat(parts, dim=-1)


def feature_applies(library: str | None, features: str) -> bool:
    """Whether a backbone of `library` (split_name's prefix) can give feature kind `features`."""
    return features == "auto" or (features in TIMM_TOKEN_FEATURES and library == "timm") or \
        (features in CLIP_FEATURES and library == "open_clip")


def check_features(library: str | None, name: str, features: str) -> None:
    """--features against the backbone's library, before anything is built."""
    if feature_applies(library, features):
        return
    if features in TIMM_TOKEN_FEATURES:
        raise LtcacheError(f"--features {features} reads a timm ViT's tokens; use --backbone timm:<vit name>, or "
                           "--features auto")
    raise LtcacheError(f"--features {features} is for CLIP image towers; use --backbone open_clip:ARCH/TAG, or "
                       "--features auto")


def timm_token_features(model: nn.Module, name: str, features: str) -> tuple[nn.Module, int]:
    """(module, dim) of a ViT's token features, or a one-line error for a model without a class token."""
    blocks, patch_mean = TIMM_TOKEN_FEATURES[features]
    if getattr(model, "cls_token", None) is None or not hasattr(model, "forward_intermediates") \
            or not hasattr(model, "blocks"):
        raise LtcacheError(f"--features {features} needs a ViT with a class token; timm:{name} has none (use "
                           "--features auto)")
    if blocks > len(model.blocks):
        raise LtcacheError(f"--features {features} reads the last {blocks} blocks; timm:{name} has {len(model.blocks)}")
    return TimmTokenFeatures(model, blocks, patch_mean), model.embed_dim * (blocks + int(patch_mean))


TIMM_CONFIG_KEYS = ("architecture", "kwargs")


def read_timm_config(name: str) -> tuple[str, dict]:
    """(architecture, kwargs) of a timm model config .json: {"architecture": NAME, "kwargs": {...}}, how a custom or
    tiny model is named (e.g. a DINOv2 ViT with 4 blocks of width 48). Checked before timm builds anything: UTF-8
    JSON, a known architecture, kwargs of numbers, strings, booleans and lists of them, every integer from 0 to
    2**20, every number finite, and a transformer small enough to allocate."""
    from ltcache.core.fsutil import read_text

    timm = import_library("timm")
    path = Path(name).expanduser()
    if not path.is_file():
        raise LtcacheError(f"timm model config {path} does not exist; pass a timm model name or the path of a .json "
                           'with {"architecture": NAME, "kwargs": {...}}')
    try:
        config = json.loads(read_text(path, "timm model config"))
    except ValueError as exc:
        raise LtcacheError(f"timm model config {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or set(config) - set(TIMM_CONFIG_KEYS) or \
            not isinstance(config.get("architecture"), str) or not isinstance(config.get("kwargs", {}), dict):
        raise LtcacheError(f'timm model config {path} needs "architecture" (a timm model name) and optionally '
                           '"kwargs" (an object), nothing else')
    architecture, kwargs = config["architecture"], config.get("kwargs", {})
    if not timm.is_model(architecture):
        raise unknown_name("timm model", architecture, timm.list_models(), instead="see timm.list_models()")

    def check(value, where: str) -> None:
        if isinstance(value, list):
            for index, item in enumerate(value):
                check(item, f"{where}[{index}]")
        elif isinstance(value, bool) or isinstance(value, str) or value is None:
            return
        elif isinstance(value, int):
            if not 0 <= value <= MAX_CONFIG_INT:
                raise LtcacheError(f"timm model config {path}: {where} = {value} must be an integer from 0 to "
                                   f"{MAX_CONFIG_INT}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise LtcacheError(f"timm model config {path}: {where} must be a finite number")
        else:
            raise LtcacheError(f"timm model config {path}: {where} must be a number, string, boolean or list")

    for key, value in kwargs.items():
        check(value, f"kwargs.{key}")
    width, depth = kwargs.get("embed_dim", 0), kwargs.get("depth", 0)
    if isinstance(width, int) and isinstance(depth, int) and 12 * depth * width * width > MAX_TOWER_PARAMETERS:
        raise LtcacheError(f"timm model config {path}: embed_dim {width} and depth {depth} would hold more than 10^10 "
                           "weights; check them")
    return architecture, kwargs


def create_timm(name: str, pretrained: bool):
    """timm.create_model of a model name, or of a model config .json (random weights); a config's kwargs that the
    architecture does not take are a one-line error."""
    timm = import_library("timm")
    if not name.endswith(".json"):
        return timm.create_model(name, pretrained=pretrained)
    architecture, kwargs = read_timm_config(name)
    try:
        return timm.create_model(architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise LtcacheError(f"timm cannot build {architecture} from {name} ({type(exc).__name__}: {reason})") from None


def check_timm(name: str, pretrained: bool) -> None:
    timm = import_library("timm")
    if name.endswith(".json"):
        if pretrained:
            raise LtcacheError("a timm model config describes an architecture with random weights; drop --pretrained")
        read_timm_config(name)
        return
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        raise unknown_name("timm model", architecture, timm.list_models(), instead="see timm.list_models()")
    if pretrained and not timm.list_pretrained(architecture + "*"):
        raise LtcacheError(f"timm has no pretrained weights for {architecture}; drop --pretrained")
    if pretrained and tag and name not in timm.list_pretrained(name):
        raise LtcacheError(f"timm has no pretrained tag {tag!r} for {architecture}; tags: "
                           f"{', '.join(t.partition('.')[2] for t in timm.list_pretrained(architecture + '.*')[:6])}")


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    """The eval transform timm's own config gives: input size, crop_pct, interpolation, mean, std."""
    import math

    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    height, width = config["input_size"][1:]
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None and not getattr(model, "dynamic_img_size", False):  # a ViT built for another size (kwargs)
        height, width = int(fixed[0]), int(fixed[1])
    crop_pct = config.get("crop_pct") or 1.0
    squash = config.get("crop_mode") == "squash"
    return Preprocessing((height, width), math.floor(min(height, width) / crop_pct), config["interpolation"],
                         tuple(config["mean"]), tuple(config["std"]), squash)


def timm_model(name: str, pretrained: bool, features: str = "auto"):
    """(features module, feature dim, own classifier (W, b) or None, label names or None, preprocessing). The own
    classifier reads the pre-logits feature, so it is kept only with features auto."""
    model = create_timm(name, pretrained)
    classifier = model.get_classifier()
    own = None
    if isinstance(classifier, nn.Linear) and classifier.bias is not None:
        own = (classifier.weight.detach().clone(), classifier.bias.detach().clone())
    model.reset_classifier(0)
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    labels = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        labels = list(ImageNetInfo(subset).label_names()) if subset else None
    except (ImportError, ValueError, KeyError, OSError):
        labels = None
    if features in TIMM_TOKEN_FEATURES:
        module, dim = timm_token_features(model, name, features)
        return module, dim, None, labels, timm_preprocessing(model)
    return TimmFeatures(model), dim, own, labels, timm_preprocessing(model)


# ------------------------------------------------------------------------------------------------------ open_clip


class ClipImageFeatures(nn.Module):
    """A CLIP image tower's embedding (after the projection, in the text tower's space; not normalized), or with
    `pre_projection` its output before the projection (the tower's `proj` is then taken out of it and kept as
    `projection` [width, embed_dim]: the projected embedding is features @ projection)."""

    def __init__(self, model: nn.Module, pre_projection: bool = False):
        super().__init__()
        self.visual = model.visual
        self.projection = None
        if pre_projection:
            proj = getattr(self.visual, "proj", None)
            if not isinstance(proj, torch.Tensor):
                raise LtcacheError(f"--features pre_projection / both needs a CLIP ViT image tower with a separate "
                                   f"projection; {type(self.visual).__name__} has none (use --features projected)")
            self.projection = proj.detach().float().clone()
            self.visual.proj = None  # open_clip's ViT skips its projection when proj is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def split_tag(name: str) -> tuple[str, str]:
    """('ViT-B-16', 'openai') of 'ViT-B-16/openai'; a config path keeps its slashes: ('/a/tiny.json', 'x')."""
    if ".json" in name:
        end = name.index(".json") + len(".json")
        return name[:end], name[end + 1:] if name[end:end + 1] == "/" else name[end:]
    arch, _, tag = name.partition("/")
    return arch, tag


def open_clip_arch(name: str) -> tuple[str, str | None]:
    """(arch, tag) of 'ViT-B-16/openai'; an arch that is a path to a model config .json is registered with
    open_clip (its file stem becomes the arch name): how a custom or tiny tower is named."""
    arch, tag = split_tag(name)
    if arch.endswith(".json"):
        open_clip = import_library("open_clip")
        path = Path(arch).expanduser()
        if not path.is_file():
            raise LtcacheError(f"open_clip model config {path} does not exist; pass an open_clip arch name or the "
                               "path of a model config .json")
        check_open_clip_config(path)
        try:
            open_clip.add_model_config(path)
        except (ValueError, KeyError, OSError) as exc:
            raise LtcacheError(f"open_clip cannot read model config {path} ({type(exc).__name__}); it needs "
                               "embed_dim, vision_cfg and text_cfg") from None
        if open_clip.get_model_config(path.stem) is None:
            raise LtcacheError(f"open_clip did not register {path} (it needs embed_dim, vision_cfg and text_cfg)")
        arch = path.stem
    return arch, tag or None


MAX_CONFIG_INT = 1 << 20  # no width, depth, size or vocabulary of a real tower comes near it
MAX_TOWER_PARAMETERS = 10**10  # about 40 GB of float32 weights: a typo, not a model


def check_open_clip_config(path: Path) -> dict:
    """A model config .json for open_clip, checked before open_clip builds anything from it: UTF-8 JSON with
    embed_dim, vision_cfg and text_cfg; every integer in it from 0 to 2**20 (widths, depths, heads and sizes at least
    1) and every number finite; each tower small enough to allocate. A negative width fails deep inside torch, an
    enormous one allocates terabytes."""
    from ltcache.core.fsutil import read_text

    try:
        config = json.loads(read_text(path, "open_clip model config"))
    except ValueError as exc:
        raise LtcacheError(f"open_clip model config {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not _is_count(config.get("embed_dim")) or not all(
            isinstance(config.get(key), dict) for key in ("vision_cfg", "text_cfg")):
        raise LtcacheError(f"open_clip model config {path} needs a positive integer embed_dim and the objects "
                           "vision_cfg and text_cfg")
    positive = ("embed_dim", "width", "layers", "heads", "patch_size", "image_size", "context_length", "vocab_size")

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")
        elif where.rsplit(".", 1)[-1] in positive and (isinstance(value, bool) or not isinstance(value, int)):
            raise LtcacheError(f"open_clip model config {path}: {where} must be an integer, got {repr(value)[:40]}")
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            return
        elif isinstance(value, int):
            low = 1 if where.rsplit(".", 1)[-1] in positive else 0
            if not low <= value <= MAX_CONFIG_INT:
                raise LtcacheError(f"open_clip model config {path}: {where} = {value} must be an integer from {low} "
                                   f"to {MAX_CONFIG_INT}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise LtcacheError(f"open_clip model config {path}: {where} must be a finite number")

    walk(config, "")
    for tower in ("vision_cfg", "text_cfg"):
        cfg = config[tower]
        width, layers = cfg.get("width", 0), cfg.get("layers", 0)
        if isinstance(width, int) and isinstance(layers, int) and 12 * layers * width * width > MAX_TOWER_PARAMETERS:
            raise LtcacheError(f"open_clip model config {path}: {tower} (width {width}, {layers} layers) would hold "
                               "more than 10^10 weights; check width and layers")
    return config


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CONFIG_INT


def check_open_clip(name: str, pretrained: bool) -> None:
    open_clip = import_library("open_clip")
    arch, tag = open_clip_arch(name)
    if open_clip.get_model_config(arch) is None:
        raise unknown_name("open_clip model", arch, open_clip.list_models(), instead="see open_clip.list_models()")
    if pretrained and not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise LtcacheError(f"--pretrained needs a tag: open_clip:{arch}/TAG with TAG one of "
                           f"{', '.join(tags[:6]) or '(none known)'}")
    if tag and not open_clip.get_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise LtcacheError(f"open_clip has no pretrained tag {tag!r} for {arch}; tags: {', '.join(tags[:6]) or 'none'}")


def open_clip_model(name: str, pretrained: bool, features: str = "auto"):
    """(CLIP model, features module, feature dim, tokenizer, preprocessing). Without `pretrained` the weights are
    random, but a tag still chooses its preprocessing (e.g. the OpenAI mean and std). With features pre_projection
    or both, the module gives the tower's output before its projection (ClipImageFeatures.projection)."""
    open_clip = import_library("open_clip")
    arch, tag = open_clip_arch(name)
    extra = {}
    if tag and not pretrained:  # the tag's architecture switch (OpenAI's QuickGELU), without its weights
        extra["force_quick_gelu"] = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
    model = open_clip.create_model(arch, pretrained=tag if pretrained else None, **extra)
    model.eval()
    module = ClipImageFeatures(model, pre_projection=features in ("pre_projection", "both"))
    dim = int(open_clip.get_model_config(arch)["embed_dim"]) if module.projection is None \
        else int(module.projection.shape[0])
    return model, module, dim, open_clip.get_tokenizer(arch), open_clip_preprocessing(arch, tag)


def open_clip_preprocessing(arch: str, tag: str | None) -> Preprocessing:
    """The eval transform open_clip builds for `arch` with weights `tag`, from its configs alone (nothing is
    built or downloaded): the vision tower's image size, then the model config's preprocess_cfg, then the tag's
    mean, std, interpolation and resize mode, each overriding the one before (OpenAI's mean and std, bicubic,
    shortest-side resize by default)."""
    open_clip = import_library("open_clip")
    model_config = open_clip.get_model_config(arch)
    config = {"size": model_config["vision_cfg"].get("image_size", 224), "mean": open_clip.OPENAI_DATASET_MEAN,
              "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    config.update(model_config.get("preprocess_cfg", {}))
    pretrained = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    config.update({key: pretrained[key] for key in ("mean", "std", "interpolation", "resize_mode")
                   if key in pretrained})
    size = config["size"] if isinstance(config["size"], (tuple, list)) else (config["size"], config["size"])
    if config["resize_mode"] not in ("shortest", "squash"):
        raise LtcacheError(f"open_clip resize_mode {config['resize_mode']!r} of {arch} is not supported; use a tag "
                           "with 'shortest' or 'squash' resizing")
    return Preprocessing((int(size[0]), int(size[1])), int(min(size)), config["interpolation"],
                         tuple(config["mean"]), tuple(config["std"]), squash=config["resize_mode"] == "squash")


TEMPLATE_SETS = ("openai", "simple")


def read_templates(templates: str) -> list:
    """open_clip's 80 OpenAI ImageNet prompts ('openai'), its 7 simple ones ('simple'), or a text file with one
    template per line, each holding '{}' where the class name goes."""
    from open_clip import zero_shot_metadata as metadata

    if templates == "openai":
        return list(metadata.OPENAI_IMAGENET_TEMPLATES)
    if templates == "simple":
        return list(metadata.SIMPLE_IMAGENET_TEMPLATES)
    path = Path(templates).expanduser()
    if not path.is_file():
        raise LtcacheError(f"--templates {templates!r} is neither openai, simple nor a file; pass a text file with "
                           "one prompt per line, each with {} for the class name")
    lines = read_lines(path, "--templates")
    bad = [line for line in lines if not is_template(line)]
    if not lines or bad:
        raise LtcacheError(f"--templates {path}: every line needs exactly one {{}} for the class name, and other "
                           f"braces doubled ({{{{ and }}}}) (got {bad[0]!r})" if bad
                           else f"--templates {path} is empty")
    return lines


def is_template(line: str) -> bool:
    """Whether `line` formats with exactly one class name: one bare {} field (no name, conversion or format spec)
    and balanced braces. 'a photo of a {{}}' inserts no name (it formats to a literal {}); 'a {' does not format."""
    import string

    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(line)
                  if name is not None]
    except ValueError:
        return False
    return fields == [("", "", None)]


def prompt_names(class_names: list[str], names_file: Path | None) -> tuple[list[str], str]:
    """The class names the text tower reads, and where they come from: --class-names FILE (one per line, in label
    order), CLIP's curated ImageNet names when the dataset's classes are the 1000 ImageNet wnids (ImageNet-LT),
    else the dataset's own class names with '_' read as a space."""
    if names_file is not None:
        path = Path(names_file).expanduser()
        return read_class_names(path, len(class_names)), str(path)
    if list(class_names) == imagenet_wnids():
        from open_clip import zero_shot_metadata as metadata

        return list(metadata.IMAGENET_CLASSNAMES), "open_clip's ImageNet class names (the dataset's wnids)"
    if all(name.isdigit() for name in class_names) and len(class_names) > 10:
        raise LtcacheError("the dataset's class names are numbers (e.g. iNaturalist folders); pass --class-names "
                           "FILE with one name per class, in label order, for the zero-shot text head")
    return [name.replace("_", " ") for name in class_names], "the dataset's class names"


def zero_shot_head(model: nn.Module, tokenizer, names: list[str], templates: list, device) -> torch.Tensor:
    """The text head W [C, d]: per class, the mean of the normalized text embeddings of its prompts, normalized
    and multiplied by CLIP's logit scale, so W @ normalize(f) are the model's own zero-shot logits
    (open_clip.build_zero_shot_classifier computes the class embeddings)."""
    import open_clip

    model = model.to(device)
    with torch.inference_mode():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, templates,
                                                          num_classes_per_batch=10, device=device)
        scale = model.logit_scale.exp().float().item()
    return (classifier.float().T.cpu() * scale).contiguous()


# ----------------------------------------------------------------------------------------- one frozen backbone


def imagenet_wnids() -> list[str] | None:
    """ImageNet-1k's 1000 wnids in class-index order (timm ships them), or None without timm."""
    try:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo("imagenet-1k").label_names())
    except (ImportError, ValueError, KeyError, OSError):
        return None


@dataclass
class Frozen:
    """A backbone extracted as it is: `classifier.backbone` gives the features, `transform` (None: the dataset's
    test transform) prepares the images; `own` is the model's own classifier (W, b) when it keeps it as the joint
    head, `text` the zero-shot text head W [C, d] (CLIP, --zero-shot); `about` goes into the manifest."""

    classifier: nn.Module
    transform: object | None
    own: tuple[torch.Tensor, torch.Tensor] | None
    text: torch.Tensor | None
    about: dict
    projection: torch.Tensor | None = None  # --features both: CLIP's projection, stored with the text head
    preprocessing: Preprocessing | None = None  # the library's own (None: the dataset's test transform)


def check_frozen(backbone: str, pretrained: bool, *, joint_head: str = "auto", zero_shot: bool = False,
                 templates: str | None = None, features: str = "auto") -> None:
    """Everything about a frozen backbone that can be judged before the dataset is read or a weight downloaded
    (`joint_head`'s and `features`' values are checked by their declarations, config.EXTRACT)."""
    from ltcache.stage1.models import check_backbone

    library, name = split_name(backbone)
    check_features(library, name, features)
    if features == "both" and not zero_shot:
        raise LtcacheError("--features both keeps CLIP's projection for the zero-shot text head; add --zero-shot, or "
                           "use --features pre_projection")
    if features == "pre_projection" and zero_shot:
        raise LtcacheError("the zero-shot text head reads projected features; use --features both (pre-projection "
                           "features plus the projection) with --zero-shot")
    if features in TIMM_TOKEN_FEATURES and joint_head == "own":
        raise LtcacheError(f"the model's own classifier reads its pre-logits feature, not --features {features}; use "
                           "--joint-head probe")
    if library is None:
        check_backbone(name, pretrained=pretrained)
    elif library == "timm":
        check_timm(name, pretrained)
    else:
        check_open_clip(name, pretrained)
    if zero_shot and library != "open_clip":
        raise LtcacheError("--zero-shot needs a CLIP backbone with a text tower: --backbone open_clip:ARCH/TAG")
    if library == "open_clip" and joint_head == "own":
        raise LtcacheError("a CLIP image tower has no classifier of its own; use --joint-head probe (and --zero-shot "
                           "for the text head)")
    if zero_shot and templates is not None:
        read_templates(templates)  # a bad prompt file fails before the dataset is read


def describe_frozen(backbone: str, pretrained: bool) -> dict:
    """The library, its version, the model's name and its weights (None: random): the plan and the manifest."""
    import importlib

    import torchvision

    from ltcache.stage1.models import BACKBONES

    library, name = split_name(backbone)
    if library is None:
        weights = str(torchvision.models.get_model_weights(name).DEFAULT) if pretrained else None
        return {"library": "ltcache" if name in BACKBONES else "torchvision",
                "torchvision_version": torchvision.__version__, "name": name, "weights": weights}
    module = importlib.import_module(LIBRARIES[library][0])
    about = {"library": library, f"{library}_version": getattr(module, "__version__", "unknown"), "name": name}
    if library == "open_clip":
        arch, tag = open_clip_arch(name)
        about.update(name=arch, tag=tag, weights=tag if pretrained else None)
        config = split_tag(name)[0]
        if config.endswith(".json"):
            from ltcache.core.fsutil import sha256_file

            config = Path(config).expanduser()
            about["model_config"] = {"path": str(config.resolve()), "sha256": sha256_file(config)}
    else:
        about["weights"] = name if pretrained else None
        if name.endswith(".json"):
            from ltcache.core.fsutil import sha256_file

            config = Path(name).expanduser()
            about.update(name=read_timm_config(name)[0], model_config={"path": str(config.resolve()),
                                                                       "sha256": sha256_file(config)})
    return about


def build_frozen(backbone: str, pretrained: bool, *, num_classes: int, in_channels: int, class_names: list[str],
                 joint_head: str = "auto", zero_shot: bool = False, names_file: Path | None = None,
                 templates: str = "openai", device=None, features: str = "auto") -> Frozen:
    """Build the backbone (the library downloads pretrained weights on first use), its preprocessing, its own
    classifier when the joint head is to be it, and the zero-shot text head when asked; `features` chooses what
    the backbone gives (FEATURES)."""
    with loading_weights(backbone, pretrained):
        return _build_frozen(backbone, pretrained, num_classes=num_classes, in_channels=in_channels,
                             class_names=class_names, joint_head=joint_head, zero_shot=zero_shot,
                             names_file=names_file, templates=templates, device=device, features=features)


def _build_frozen(backbone: str, pretrained: bool, *, num_classes: int, in_channels: int, class_names: list[str],
                  joint_head: str, zero_shot: bool, names_file: Path | None, templates: str, device,
                  features: str) -> Frozen:
    from ltcache.stage1.models import Classifier, build_with_own_head, pretrained_categories, pretrained_preprocessing

    library, name = split_name(backbone)
    about: dict = {}
    own, labels, text, preprocessing, projection = None, None, None, None, None
    if library is None:
        classifier, layer = build_with_own_head(name, num_classes, 3 if pretrained else in_channels,
                                                pretrained=pretrained)
        if pretrained:
            preprocessing, labels = pretrained_preprocessing(name), pretrained_categories(name)
            if labels is not None and len(labels) == 1000:  # ImageNet-1k: the same order as its sorted wnids
                labels = imagenet_wnids() or labels
        if layer is not None and layer.bias is not None:
            own = (layer.weight.detach().clone(), layer.bias.detach().clone())
    elif library == "timm":
        module, dim, own, labels, preprocessing = timm_model(name, pretrained, features)
        classifier = Classifier(module, dim, num_classes)
    else:
        model, module, dim, tokenizer, preprocessing = open_clip_model(name, pretrained, features)
        classifier = Classifier(module, dim, num_classes)
        projection = module.projection if features == "both" else None
        if zero_shot:
            prompts = read_templates(templates)
            names, source = prompt_names(class_names, names_file)
            text = zero_shot_head(model, tokenizer, names, prompts, device or "cpu")
            about["zero_shot"] = {"templates": templates if templates in TEMPLATE_SETS else str(Path(templates)),
                                  "prompts": len(prompts), "class_names": source,
                                  "logit_scale": round(float(text[0].norm()), 4),
                                  "examples": [prompts[0].format(names[0]) if isinstance(prompts[0], str)
                                               else prompts[0](names[0])]}
    about["preprocessing"] = preprocessing.describe() if preprocessing is not None \
        else "the dataset's test-time transform"
    if library is not None:
        about["features"] = {"kind": "projected" if features == "auto" and library == "open_clip" else features,
                             "dim": int(dim), "about": FEATURES["projected" if features == "auto" and
                                                                library == "open_clip" else features]}
        if projection is not None:
            about["features"]["projection"] = list(projection.shape)
    use_own, about["joint_head_choice"] = choose_joint_head(joint_head, own, labels, class_names, pretrained,
                                                            backbone, num_classes)
    return Frozen(classifier, preprocessing.transform() if preprocessing is not None else None,
                  own if use_own else None, text, about, projection, preprocessing)


def choose_joint_head(mode: str, own, labels, class_names: list[str], pretrained: bool, backbone: str,
                      num_classes: int) -> tuple[bool, str]:
    """Whether the model's own classifier is the joint head, and why: `own` asks for it (its output count must be
    the dataset's class count); `auto` takes it when pretrained weights name exactly the dataset's classes, in
    order (ImageNet weights on ImageNet-LT); otherwise the joint head is a linear probe fitted on train."""
    outputs = 0 if own is None else len(own[0])
    if mode == "own":
        if own is None:
            raise LtcacheError(f"{backbone} has no linear classifier of its own; use --joint-head probe")
        if outputs != num_classes:
            raise LtcacheError(f"{backbone}'s classifier has {outputs} outputs for the dataset's {num_classes} "
                               "classes; use --joint-head probe")
        return True, "own classifier (--joint-head own)"
    if mode == "auto" and pretrained and outputs == num_classes and labels is not None \
            and list(labels) == list(class_names):
        return True, "own classifier: the weights' classes are the dataset's classes"
    why = ("--joint-head probe" if mode == "probe" else "random weights" if not pretrained
           else "no classifier of its own" if own is None else "the weights' classes are not the dataset's")
    return False, f"linear probe ({why})"
