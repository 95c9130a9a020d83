"""The declarations (params.py) of the options that stage 2 reads, and of those both stages share: the cache's
dtype and shard size, devices, selection, shot thresholds, and the compare / sweep-tau / info commands.

config.py (stage 1) re-exports them; stage 2 imports them from here and never from config.py. No torch here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ltcache.core.errors import LtcacheError
from ltcache.core.params import GRID, Param

MAX_SEED = 2**32 - 1

DEVICE = Param("device", str, None, "cpu, cuda or cuda:N (default: CUDA when present).", optional=True)
AS_JSON = Param("as_json", bool, False, "Print JSON instead of tables.", option="--json")
SELECT = Param("select", str, "val", "Selection split: val, or train for the simulated-balanced train metric "
                "(App. B.5).", choices=("val", "train"))
MANY = Param("many", int, 100, "Many-shot: more than this many train images.", low=0, high=10**9)
FEW = Param("few", int, 20, "Few-shot: fewer than this many train images.", low=0, high=10**9)
DTYPE = Param("dtype", str, "float32", "Feature dtype in the cache.", choices=("float32", "float16"))

PLUGIN = Param("plugin", list, [], "A .py file or module that registers methods with @ltcache.method "
               "(repeatable).", option="--plugin")
SHARD_ROWS = Param("shard_rows", int, 65536, "Rows per HDF5 shard.", low=1, high=2**24)
MEMORY_BUDGET = Param("memory_budget", str, None, "Most memory one split's logits may take whole, e.g. 2G; beyond it "
                      "they are computed in row blocks (default: a quarter of the RAM, or of the GPU's memory).",
                      optional=True)
PRECISIONS = ("float32", "bf16")  # of the stage-2 matrix products (fitting.lower_precision, logits.matrix_product)
PRECISION = Param("precision", str, "float32", "Precision of the stage-2 matrix products: float32, or bf16 (inputs "
                  "rounded to bfloat16, float32 accumulation; fast on GPUs and on CPUs with AVX-512 BF16 or AMX).",
                  choices=PRECISIONS)

COMPARE = (
    Param("methods", str, None, "Comma-separated list, or 'all' (default: the paper's five).", optional=True),
    SELECT,
    Param("set_", list, [], "Hyperparameter METHOD.PARAM=VALUE (repeatable); a comma list (crt.lr=0.05,0.1) is a "
          "grid, each point chosen on the selection split; see ltcache methods.", option="--set"),
    Param("seed", int, 0, "Seed of the stochastic (trained) heads.", low=0, high=MAX_SEED),
    Param("bootstrap", int, 1000, "Test resamples for the 95% intervals (0: none).", low=0, high=1_000_000),
    Param("seeds", int, 1, "Refit each stochastic method with N seeds: mean and 95% interval.", low=1, high=1000),
    Param("train_views", bool, True, "Fit trained heads on the cache's augmented train views, when it has them "
          "(extract --train-views)."),
    Param("out", Path, None, "Write heads/ and reports/ here instead of into the cache (e.g. a read-only cache).",
          optional=True),
    Param("ablation", bool, False, "Also write reports/ablation.{md,csv,json}: every grid point's selection and "
          "test numbers, the selected point marked.", option="--ablation"),
    Param("tensorboard", bool, False, "Also write TensorBoard events into OUT/tensorboard: each method's row as "
          "hparams and metrics, each trained head's loss per epoch; needs pip install 'ltcache[tensorboard]'.",
          option="--tensorboard"),
    Param("tta", bool, False, "Also score every method with its logits averaged over the cache's test crops "
          "(extract --test-crops K): test-time ensembling, reported beside the one-view numbers; choices stay on the "
          "one-view selection split.", option="--tta"),
    Param("test_prior", str, None, "Also score every method as if test followed this class prior (SADE's shifted "
          "test sets): forward:F or backward:F (a long tail of imbalance F in the train order or reversed), uniform, "
          "train, or a file of one weight per class; reported beside the balanced numbers.", optional=True),
    Param("test_prior_mode", str, "reweight", "With --test-prior: reweight the balanced test set's per-class "
          "accuracies (exact, every row counts), or subsample it to the prior with the seed (SADE's test sets).",
          choices=("reweight", "subsample")),
    Param("protocol_audit", bool, False, "Beside each row, what the method would report if its choices were made "
          "on test (as some official stage-2 code does), and the optimism; read only, never used.",
          option="--protocol-audit"),
    PLUGIN,
    Param("config", Path, None, "TOML recipe whose [compare] table gives methods, select, set, seeds, ...; flags "
          "given on the command line win.", optional=True),
    AS_JSON, DEVICE, MANY, FEW, MEMORY_BUDGET, PRECISION,
)

SWEEP_TAU = (
    Param("taus", GRID, "0:2:0.1", "Grid: 0,0.5,1 or start:stop:step.", low=0, high=100),
    SELECT, AS_JSON, DEVICE, MANY, FEW, MEMORY_BUDGET, PRECISION,
)

INFO = (
    Param("verify", bool, False, "Also hash every file and read every split, checking all of it."),
    AS_JSON,
)

METHODS_LIST = (
    Param("as_json", bool, False, "Print JSON.", option="--json"),
    Param("markdown", str, None, "Print Markdown instead: the method table (table) or the method reference "
          "(reference) of docs/reference/, both rendered from the method cards.", choices=("table", "reference"),
          optional=True),
    PLUGIN,
)


LIST_KINDS = ("datasets", "samplers", "losses", "backbones")
LISTS = (
    Param("kind", str, None, "What to list: datasets, samplers, losses or backbones (default: all four).",
          choices=LIST_KINDS, optional=True),
    AS_JSON,
)
# The registry behind each option whose choices are a registry: --help names the `ltcache list` that shows them.
LISTED_BY = {"dataset": "datasets", "sampler": "samplers", "loss": "losses", "backbone": "backbones"}


def check_thresholds(many: int, few: int) -> None:
    """The Many / Few thresholds as given: Few may not exceed Many."""
    if few > many:
        raise LtcacheError(f"--few ({few}) must not exceed --many ({many}): the groups would overlap")




# ------------------------------------------------------------------------------------------------ recipes


def load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomllib backport
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise LtcacheError(f"recipe {path} not found; see experiments/ for the shipped recipes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LtcacheError(f"recipe {path} is not a UTF-8 text file; pass a TOML recipe such as "
                           "experiments/digits_lt.toml") from None
    except OSError as exc:
        raise LtcacheError(f"recipe {path} is unreadable ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LtcacheError(f"recipe {path} is not valid TOML ({str(exc).splitlines()[0]})") from None


COMPARE_RECIPE_KEYS = ("methods", "select", "set", "seed", "seeds", "bootstrap", "train_views", "ablation",
                       "protocol_audit", "plugin", "many", "few", "tensorboard")


def compare_recipe(path: Path) -> dict:
    """The [compare] table of a recipe, typed by COMPARE's declarations: methods (a comma list or a list of
    names), select, set (a list of METHOD.PARAM=VALUE), seed, seeds, bootstrap, train_views, ablation, plugin,
    many, few. Returned under the option names (set -> set_)."""
    table = load_toml(path)
    section = table.get("compare")
    if section is None:
        raise LtcacheError(f"recipe {path} has no [compare] table; add one (see experiments/README.md) or drop "
                           "--config")
    if not isinstance(section, dict):
        raise LtcacheError(f"recipe {path}: compare must be a table ([compare])")
    unknown = sorted(set(section) - set(COMPARE_RECIPE_KEYS))
    if unknown:
        raise LtcacheError(f"recipe {path} [compare] has unknown key {unknown[0]!r}; known keys: "
                           f"{', '.join(COMPARE_RECIPE_KEYS)}")
    declared = {("set" if p.name == "set_" else p.name): p for p in COMPARE}
    values = {}
    for key, value in section.items():
        label = f"recipe {path}: compare.{key}"
        if key == "methods" and isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise LtcacheError(f"{label} must be a list of method names")
            value = ",".join(value)
        if key in ("set", "plugin"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LtcacheError(f"{label} must be a list of strings, e.g. [\"crt.epochs=30\"]")
            values["set_" if key == "set" else key] = list(value)
            continue
        values[key] = declared[key].check(value, label)
    return values


REPORT = (
    Param("out", Path, None, "Folder for index.html, results.md, results.csv (made new; see --overwrite)."),
    Param("by", str, None, "Label inputs by these provenance fields, comma-separated dotted paths, e.g. "
          "backbone.resolved_config.sampler (default: the fields in which the inputs differ). Inputs with the same "
          "label are seeds: their mean and 95% t-interval are shown.", optional=True),
    Param("title", str, None, "Page title.", optional=True),
    Param("overwrite", bool, False, "Replace an earlier ltcache report folder at --out, once the new one is complete."),
)


def parse_params(items: list[str], *, later_wins: bool = False) -> dict[str, dict]:
    """['m.epochs=20', 'n.metric=euclidean'] -> {'m': {'epochs': '20'}, 'n': {'metric': 'euclidean'}}.
    A key given twice is an error, unless later_wins (a recipe's set, then the command line's)."""
    params: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise LtcacheError(f"--set {item!r} must look like METHOD.PARAM=VALUE; ltcache methods lists both")
        if name in params.get(method, {}) and not later_wins:
            raise LtcacheError(f"--set gives {method}.{name} twice; give each hyperparameter once")
        params.setdefault(method, {})[name] = value
    return params
