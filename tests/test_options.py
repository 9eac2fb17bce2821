"""Selector options and the seed are checked when ``prune()`` is called (not at the first forward), and default
schedules scale to shallow language models."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.families import batch, model_and_processor
from tests.test_api import assert_prune_refused
from vtprune.config import PruneConfig, expand_schedule
from vtprune.registry import get_selector

# (prune keywords, words the message must contain: the method, the option, the bad value, the valid range)
BAD_OPTIONS = [
    (dict(method="vflowopt", keep=6, cells=-1), ["vflowopt", "cells", "-1", "an int in [0, inf)"]),
    (dict(method="vflowopt", keep=6, cells=1.5), ["vflowopt", "cells", "1.5", "an int in [0, inf)"]),
    (dict(method="holov", keep=6, crops=0), ["holov", "crops", "got 0", "an int in [1, inf)"]),
    (dict(method="holov", keep=6, crops=2.0), ["holov", "crops", "2.0", "an int in [1, inf)"]),
    (dict(method="holov", keep=6, within="x"), ["holov", "within", "'x'", "'attention', 'holistic'"]),
    (dict(method="holov", keep=6, alpha=-1), ["holov", "alpha", "-1", "[0, inf)"]),
    (dict(method="holov", keep=6, alpha=float("nan")), ["holov", "alpha", "nan", "[0, inf)"]),
    (dict(method="atp", mass=-1), ["atp", "mass", "-1", "(0, 1]"]),
    (dict(method="atp", mass=1.5), ["atp", "mass", "1.5", "(0, 1]"]),
    (dict(method="atp", mass="0.9"), ["atp", "mass", "'0.9'", "(0, 1]"]),
    (dict(method="atp", min_keep=0), ["atp", "min_keep", "got 0", "an int in [1, inf)"]),
    (dict(method="atp", min_keep=2.5), ["atp", "min_keep", "2.5", "an int in [1, inf)"]),
    (dict(method="flowcut", keep=6, decay="a"), ["flowcut", "decay", "'a'", "[0, 1]"]),
    (dict(method="flowcut", keep=6, decay=5.0), ["flowcut", "decay", "5.0", "[0, 1]"]),
    (dict(method="flowcut", keep=6, decay=-0.1), ["flowcut", "decay", "-0.1", "[0, 1]"]),
    (dict(method="pdrop", schedule="x"), ["pdrop", "schedule", "'x'", "(layer: int >= 1, keep ratio in (0, 1])"]),
    (dict(method="pdrop", schedule=[]), ["pdrop", "schedule", "[]", "non-empty"]),
    (dict(method="pdrop", schedule=[(1,)]), ["pdrop", "schedule", "(1,)", "not a (layer, ratio) pair"]),
    (dict(method="pdrop", schedule=[(0, 0.5)]), ["pdrop", "schedule", "layer 0", "int >= 1"]),
    (dict(method="pdrop", schedule=[(1.0, 0.5)]), ["pdrop", "schedule", "layer 1.0", "int >= 1"]),
    (dict(method="pdrop", schedule=[(1, 0)]), ["pdrop", "schedule", "ratio 0", "(0, 1]"]),
    (dict(method="pdrop", schedule=[(1, 1.5)]), ["pdrop", "schedule", "ratio 1.5", "(0, 1]"]),
    (dict(method="pdrop", schedule=[(2, 0.5), (1, 0.25)]), ["pdrop", "layer 1 does not come after layer 2"]),
    (dict(method="pdrop", schedule=[(1, 0.5), (1, 0.25)]), ["pdrop", "layer 1 does not come after layer 1"]),
    (dict(method="atp", schedule=[(1, 0.25), (2, 0.5)]), ["atp", "ratio 0.5 at layer 2 exceeds 0.25 at layer 1"]),
    (dict(method="pdrop", keep_ratio=0.5, layer=1, schedule=[(1, 0.5)]), ["pdrop", "schedule", "layer=1", "not both"]),
    (dict(method="random", keep=6, seed=2**70), ["seed", str(2**70), "[0, 2**32)"]),
    (dict(method="random", keep=6, seed=2**32), ["seed", str(2**32), "[0, 2**32)"]),
    (dict(method="random", keep=6, seed=-1), ["seed", "-1", "[0, 2**32)"]),
    (dict(method="random", keep=6, seed=1.0), ["seed", "1.0", "[0, 2**32)"]),
    (dict(method="random", keep=6, seed=True), ["seed", "True", "[0, 2**32)"]),
]


@pytest.mark.parametrize("kwargs,words", BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_bad_option_raises_at_prune_time_and_leaves_model_untouched(kwargs, words):
    assert_prune_refused(kwargs, words)


@pytest.mark.parametrize("kwargs,words", BAD_OPTIONS[:3], ids=["cells", "cells-float", "crops"])
def test_bad_option_raises_from_every_config_form(kwargs, words):
    for make in (lambda: PruneConfig.from_dict(kwargs).validate(),
                 lambda: PruneConfig.from_dict({"stages": [kwargs]}).validate(),
                 lambda: PruneConfig.from_json(PruneConfig.single(**kwargs).to_json()).validate()):
        with pytest.raises(ValueError, match=f"option {words[1]} must be"):
            make()


GOOD_OPTIONS = [
    dict(method="vflowopt", keep=6, cells=0),
    dict(method="vflowopt", keep=6, cells=10**9),
    dict(method="holov", keep=6, crops=1, alpha=0, within="holistic"),
    dict(method="atp", mass=1.0, min_keep=100_000),
    dict(method="atp", mass=1e-6, schedule=[[1, 1.0]]),  # JSON gives lists, not tuples
    dict(method="flowcut", keep=6, decay=0.0),
    dict(method="flowcut", keep=6, decay=1),
    dict(method="pdrop", schedule=[(1, 0.5)]),
    dict(method="pdrop", schedule=((1, 1), (2, 1.0))),  # equal ratios are fine
    dict(method="random", keep=6, seed=0),
    dict(method="random", keep=6, seed=2**32 - 1),
]


@pytest.mark.parametrize("kwargs", GOOD_OPTIONS, ids=[str(i) for i in range(len(GOOD_OPTIONS))])
def test_valid_options_are_accepted_and_round_trip(kwargs):
    cfg = PruneConfig.single(**kwargs).validate()
    again = PruneConfig.from_json(cfg.to_json()).validate()  # JSON turns schedule pairs into lists
    assert again.resolved(3).to_dict() == cfg.resolved(3).to_dict()  # 3 layers: the shipped demo models' depth


def test_every_selector_with_options_checks_them():
    """Every option a selector declares is checked by its check_options (a wrong type is always refused)."""
    for name in vtprune.list_methods():
        spec = get_selector(name)
        if not spec.options:
            continue
        assert spec.check_options is not None, name
        spec.check_options(dict(spec.options))  # the defaults pass
        for opt in spec.options:
            with pytest.raises(ValueError, match=rf"{name}: option {opt} must be"):
                spec.check_options({opt: object()})


def test_selector_functions_check_the_same_options():
    """select_tokens refuses the values prune() refuses, with the same message."""
    feats = torch.randn(1, 16, 4)
    att = torch.rand(1, 16)
    cases = [("vflowopt", dict(vflow_importance=att, grid=(4, 4), cells=-1), "option cells"),
             ("holov", dict(cls_attention=att, crops=0), "option crops"),
             ("atp", dict(text_attention=att, mass=-1), "option mass"),
             ("atp", dict(text_attention=att, min_keep=0), "option min_keep"),
             ("flowcut", dict(flow_stats=torch.rand(1, 3, 16), decay=5.0), "option decay")]
    for name, kw, what in cases:
        with pytest.raises(ValueError, match=rf"{name}: {what} must be"):
            get_selector(name).fn(feats, 4, **kw)


def test_huge_cells_costs_nothing():
    """cells is clamped by arithmetic, not counted down one by one (10**12 would take hours)."""
    feats, imp = torch.randn(1, 16, 4), torch.rand(1, 16)
    a = get_selector("vflowopt").fn(feats, 8, vflow_importance=imp, grid=(4, 4), cells=10**12)
    b = get_selector("vflowopt").fn(feats, 8, vflow_importance=imp, grid=(4, 4), cells=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------- schedules and depth

EXPECTED = {
    ("pdrop", 2): [(1, 0.125)],
    ("pdrop", 3): [(1, 0.5), (2, 0.125)],
    ("pdrop", 4): [(1, 0.5), (2, 0.25), (3, 0.125)],
    ("pdrop", 32): [(8, 0.5), (16, 0.25), (24, 0.125)],
    ("atp", 2): [(1, 0.125)],
    ("atp", 3): [(1, 0.25), (2, 0.125)],
    ("atp", 32): [(4, 0.5), (14, 0.25), (24, 0.125)],
}


@pytest.mark.parametrize("method,n_layers", list(EXPECTED))
def test_default_schedule_scales_to_depth(method, n_layers):
    assert expand_schedule(method, get_selector(method).schedule, n_layers) == EXPECTED[method, n_layers]
    cfg = PruneConfig.single(method).validate().resolved(n_layers)
    assert [(s.layer, s.keep_ratio) for s in cfg.stages] == EXPECTED[method, n_layers]
    assert all(1 <= s.layer < n_layers for s in cfg.stages)


def test_default_schedule_needs_two_layers_and_explicit_schedule_is_kept_as_given():
    with pytest.raises(ValueError, match="'pdrop'.*at least 2 decoder layers; this one has 1"):
        PruneConfig.single("pdrop").validate().resolved(1)
    cfg = PruneConfig.single("pdrop", schedule=[(2, 0.5), (5, 0.25)]).validate()
    assert [(s.layer, s.keep_ratio) for s in cfg.resolved(32).stages] == [(2, 0.5), (5, 0.25)]
    with pytest.raises(ValueError, match=r"llm:5 is past the last decoder layer.*valid layers 1\.\.2"):
        cfg.resolved(3)


@pytest.mark.parametrize("method,opts", [("pdrop", {}), ("atp", {"mass": 0.9})])
@pytest.mark.parametrize("text_layers", [2, 3])
def test_default_schedules_run_on_shallow_language_models(method, opts, text_layers):
    """``prune(model, method="atp", mass=0.9)`` and default ``pdrop`` on 2- and 3-layer language models (the shipped
    demo models have 3): prune, then a forward whose report shows every stage."""
    model, _ = model_and_processor("llava", text_layers)
    vtprune.prune(model, method=method, **opts)
    with torch.no_grad():
        out = model(**batch("llava", [0]))
    assert torch.isfinite(out.logits).all()
    want = EXPECTED[method, text_layers]
    assert sorted({im.stage for im in vtprune.last_report(model).images}) == [f"llm:{k}" for k, _ in want]
