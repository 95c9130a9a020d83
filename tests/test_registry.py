"""One registry style (registry.py) for datasets, backbones, losses, samplers, methods and head kinds."""

import pytest

from ltcache.core.errors import LtcacheError
from ltcache.core.registry import Registry


def test_register_get_and_errors():
    things = Registry("thing")

    @things.register("a")
    def make_a():
        return 1

    assert things["a"] is make_a and "a" in things and things.names() == ["a"]
    with pytest.raises(LtcacheError, match="thing 'a' is already registered"):
        things.register("a")(make_a)
    things.register("a", replace=True)(make_a)
    with pytest.raises(LtcacheError, match=r"unknown thing 'b'; choose one of: a"):
        things["b"]
    things.remove("a")
    assert "a" not in things


def test_builtins_load_on_first_use_and_every_kind_uses_the_registry():
    from ltcache.heads import HEAD_KINDS, LinearHead
    from ltcache.stage2 import METHODS

    assert isinstance(METHODS, Registry) and isinstance(HEAD_KINDS, Registry)
    assert HEAD_KINDS["linear"] is LinearHead and LinearHead.kind == "linear"
    assert {"joint", "ncm", "crt", "tau_norm", "lws"} <= set(METHODS)
    from ltcache.data import DATASETS
    from ltcache.data.samplers import SAMPLERS
    from ltcache.stage1.losses import LOSSES
    from ltcache.stage1.models import BACKBONES

    for registry in (DATASETS, SAMPLERS, LOSSES, BACKBONES):
        assert isinstance(registry, Registry) and len(registry) > 0
    assert "digits-lt" in DATASETS and "class" in SAMPLERS and "focal" in LOSSES and "smallresnet8" in BACKBONES


def test_method_metadata_drives_the_lab():
    from ltcache.stage2 import METHODS, method_names, paper_methods

    assert paper_methods() == ["joint", "ncm", "crt", "tau_norm", "lws"]
    assert method_names()[:5] == paper_methods()
    assert METHODS["crt"].stochastic and not METHODS["ncm"].stochastic
    assert METHODS["tau_norm"].curve and METHODS["tau_norm"].figures[0].name == "tau_curve"
    assert "shifted_priors_adapted" in METHODS["logit_adj"].analyses
    assert {n for n in method_names() if METHODS[n].weight_norms} == {"joint", "crt", "tau_norm", "lws"}
