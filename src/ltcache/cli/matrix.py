"""`ltcache matrix`: every backbone x dataset pair extracted and compared in one command, as CLIP_benchmark users run
one command per pair and collect a CSV. It resumes after a kill and skips the pairs already done: a pair is done
when its cache holds a comparison of the cache's own generation; a pair whose extract was killed continues it
(extract --resume); and it ends in one `ltcache report` page over every pair, with its merged CSV and
CLIP_benchmark-style rows.

The folder (--out):
    matrix.json            what was asked (the options every pair shares) and each pair's state
    caches/DATASET--MODEL  one cache per pair; compare writes its reports/ into it
    report/                ltcache report over every cache: index.html, results.{md,csv}, clip_benchmark.csv
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ltcache.core.console import log
from ltcache.core.errors import LtcacheError
from ltcache.core.fsutil import atomic_write
from ltcache.core.options import COMPARE
from ltcache.core.params import Param, checked
from ltcache.stage1.config import EXTRACT, FEATURE_KINDS

MATRIX_FILE = "matrix.json"
FORMAT = "ltcache-matrix/1"
TEXT_HEAD = next(param.name for param in EXTRACT if param.flag == "--zero-shot")
_EXTRACT_KEYS = ("pretrained", "features", TEXT_HEAD, "templates", "test_crops", "crop_expand", "joint_head",
                 "dtype", "batch_size", "workers", "shard_rows")
_COMPARE_KEYS = ("methods", "select", "seed", "bootstrap", "seeds", "tta", "memory_budget", "precision")


def _declared(params: tuple[Param, ...], names: tuple[str, ...]) -> tuple[Param, ...]:
    by_name = {param.name: param for param in params}
    return tuple(by_name[name] for name in names)


MATRIX = (
    Param("backbones", str, None, "Comma-separated backbones, each as extract takes it: timm:NAME, "
          "open_clip:ARCH/TAG, a torchvision model name."),
    Param("datasets", str, None, "Comma-separated datasets (ltcache list datasets)."),
    Param("out", Path, None, "The matrix folder: matrix.json, caches/, report/. Run the same command again to "
          "resume: finished pairs are skipped, a killed extract continues."),
    Param("root", list, [], "Where a dataset's files are, DATASET=PATH (repeatable)."),
    *_declared(EXTRACT, tuple(key for key in _EXTRACT_KEYS if key != "features")),
    Param("features", str, "auto", "What each backbone gives, as extract --features; a comma list names one per "
          "library (e.g. cls_patch,both: DINOv2's protocol for the timm ViTs, pre-projection features plus the "
          "projection for CLIP), and a backbone whose library none applies to gets auto."),
    *_declared(COMPARE, ("set_",)),
    *_declared(COMPARE, _COMPARE_KEYS),
    *_declared(EXTRACT, ("device",)),
)


def features_for(backbone: str, features: list[str]) -> str:
    """The first of `features` that applies to the backbone's library (timm ViT tokens for timm:, the CLIP options for
    open_clip:), else auto."""
    from ltcache.stage1.hub import feature_applies, split_name

    library = split_name(backbone)[0]
    return next((kind for kind in features if feature_applies(library, kind)), "auto")


def parse_features(text: str) -> list[str]:
    kinds = [kind.strip() for kind in (text or "auto").split(",") if kind.strip()] or ["auto"]
    for kind in kinds:
        if kind not in FEATURE_KINDS:
            raise LtcacheError(f"--features {kind!r} is not one of {', '.join(FEATURE_KINDS)}")
    return kinds


def pair_name(dataset: str, backbone: str) -> str:
    """A folder name for the pair: 'fashion-mnist-lt--open_clip-ViT-B-16-openai' (a config path by its file stem)."""
    library, colon, rest = backbone.partition(":")
    model = rest if colon else backbone
    if ".json" in model:  # a model config path: its file name says what it is
        head, _, tail = model.partition(".json")
        model = Path(head).name + tail
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{library}-{model}" if colon else model).strip("-.")
    return f"{dataset}--{slug}"


def parse_roots(items: list[str], datasets: list[str]) -> dict[str, str]:
    roots: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LtcacheError(f"--root {item!r} must look like DATASET=PATH, e.g. --root imagenet-lt=/data/imagenet")
        if name not in datasets:
            raise LtcacheError(f"--root names {name!r}, which is not among --datasets ({', '.join(datasets)})")
        if name in roots:
            raise LtcacheError(f"--root gives {name} twice; give each dataset's folder once")
        roots[name] = path
    return roots


def _names(text: str, what: str) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if not names:
        raise LtcacheError(f"--{what} names nothing; give a comma-separated list")
    if len(set(names)) != len(names):
        raise LtcacheError(f"--{what} names {next(n for n in names if names.count(n) > 1)!r} twice; give each once")
    return names


def _state(folder: Path) -> dict:
    path = folder / MATRIX_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LtcacheError(f"{path} is not readable JSON; remove it (the caches beside it stay usable) or use another "
                           "--out") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("pairs"), dict):
        raise LtcacheError(f"{path} is not an ltcache matrix file; use another --out")
    return state


def _save(folder: Path, state: dict) -> None:
    text = json.dumps(state, indent=1, sort_keys=True) + "\n"
    atomic_write(folder / MATRIX_FILE, lambda tmp: tmp.write_text(text))


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise LtcacheError(f"--out {folder} is a file; pass a folder for the matrix")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MATRIX_FILE).exists():
        raise LtcacheError(f"--out {folder} is a folder that holds no ltcache matrix; pass an empty or new folder")


def compared(cache: Path) -> bool:
    """Whether `cache` is complete and holds a comparison of its own generation (a done pair)."""
    from ltcache.cache.reader import read_manifest

    results = cache / "reports" / "results.json"
    if not (cache / "manifest.json").is_file() or not results.is_file():
        return False
    try:
        manifest = read_manifest(cache)
        return json.loads(results.read_text()).get("cache_generation") == manifest.get("generation")
    except (LtcacheError, OSError, ValueError):
        return False


def _methods_for(cache: Path, methods: str | None, label: str) -> str | None:
    """The pair's methods: those that need CLIP's text head sit out of a cache without one (as under 'all')."""
    from ltcache.cache.reader import FeatureCache
    from ltcache.stage2.core import METHODS, resolve_method_list

    if not methods or methods.strip() == "all" or FeatureCache(cache).text_head() is not None:
        return methods
    names = resolve_method_list(methods)
    kept = [name for name in names if not METHODS[name].text]
    if len(kept) < len(names):
        log(f"{label}: {', '.join(n for n in names if n not in kept)} sit out (no zero-shot text head)")
    if not kept:
        raise LtcacheError(f"{label}: every method of --methods needs CLIP's text head, which this pair's cache lacks")
    return ",".join(kept)


@checked(*MATRIX)
def run_matrix(*, backbones: str, datasets: str, out: Path, root: list[str] | None = None,
               set_: list[str] | None = None, device: str | None = None, **options) -> dict:
    """Extract and compare every dataset x backbone pair into `out`, skipping the pairs already compared, then write
    one report over all of them. `options` are extract's and compare's (MATRIX); `set_` compare's --set items
    (METHOD.PARAM=VALUE). Returns {"pairs": {name: state}, "report": paths}."""
    from ltcache.core.folders import dead_staging
    from ltcache.core.options import parse_params
    from ltcache.data.spec import dataset_registry
    from ltcache.lab import compare
    from ltcache.report.page import build_report
    from ltcache.stage1.extract import extract
    from ltcache.stage1.hub import check_frozen, split_name

    folder = Path(out)
    backbone_list, dataset_list = _names(backbones, "backbones"), _names(datasets, "datasets")
    for dataset in dataset_list:
        dataset_registry().get(dataset)  # an unknown name is a one-line error listing the known ones
    roots = parse_roots(list(root or []), dataset_list)
    params = parse_params(list(set_ or []))
    extract_options = {key: options[key] for key in _EXTRACT_KEYS if key in options}
    compare_options = {key: options[key] for key in _COMPARE_KEYS if key in options}
    if compare_options.get("tta") and not extract_options.get("test_crops"):
        raise LtcacheError("--tta needs --test-crops K: the crops are extracted with each pair")
    kinds = parse_features(extract_options.get("features", "auto"))
    for backbone in backbone_list:  # every pair's options judged before any pair runs
        clip = split_name(backbone)[0] == "open_clip"
        check_frozen(backbone, extract_options.get("pretrained", False),
                     joint_head=extract_options.get("joint_head", "auto"),
                     **{TEXT_HEAD: bool(extract_options.get(TEXT_HEAD)) and clip},
                     templates=extract_options.get("templates"), features=features_for(backbone, kinds))
    _check_folder(folder)
    shared = {"extract": {k: (str(v) if isinstance(v, Path) else v) for k, v in extract_options.items()},
              "compare": {**compare_options, "set": list(set_ or [])}}
    state = _state(folder)
    if state and state.get("options") != shared:
        raise LtcacheError(f"{folder} holds a matrix run with other extract or compare options; run it with the same "
                           "options to resume it, or pass another --out")
    state = state or {"format": FORMAT, "options": shared, "pairs": {}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "caches").mkdir(exist_ok=True)
    _save(folder, state)
    caches = []
    pairs = [(dataset, backbone) for dataset in dataset_list for backbone in backbone_list]
    for number, (dataset, backbone) in enumerate(pairs, 1):
        name = pair_name(dataset, backbone)
        cache = folder / "caches" / name
        caches.append(cache)
        label = f"[{number}/{len(pairs)}] {dataset} x {backbone}"
        if compared(cache):
            log(f"{label}: done earlier, skipped")
            state["pairs"][name] = {**state["pairs"].get(name, {}), "state": "compared"}
            continue
        begin = time.perf_counter()
        if not (cache / "manifest.json").is_file():
            resume = bool(dead_staging(cache))
            log(f"{label}: extracting" + (" (continuing the killed extract)" if resume else ""))
            state["pairs"][name] = {"dataset": dataset, "backbone": backbone, "state": "extracting"}
            _save(folder, state)
            clip = split_name(backbone)[0] == "open_clip"
            extract(None, cache, dataset=dataset, backbone=backbone, root=roots.get(dataset), device=device,
                    resume=resume, **{**extract_options, TEXT_HEAD: bool(extract_options.get(TEXT_HEAD)) and clip,
                                      "features": features_for(backbone, kinds)})
        log(f"{label}: comparing")
        state["pairs"][name] = {"dataset": dataset, "backbone": backbone, "state": "comparing"}
        _save(folder, state)
        compare(cache, params=params, device=device, log=log,
                **{**compare_options, "methods": _methods_for(cache, compare_options.get("methods"), label)})
        state["pairs"][name] = {"dataset": dataset, "backbone": backbone, "state": "compared",
                                "seconds": round(time.perf_counter() - begin, 1)}
        _save(folder, state)
    log(f"report over {len(caches)} pairs")
    paths = build_report(caches, folder / "report", overwrite=(folder / "report").exists(),
                         title=f"ltcache matrix: {len(dataset_list)} datasets x {len(backbone_list)} backbones")
    state["report"] = paths
    _save(folder, state)
    return {"pairs": state["pairs"], "report": paths}
