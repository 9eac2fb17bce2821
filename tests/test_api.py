"""Public API: bad input errors, config round-trip, lean import, select_tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vtprune
from tests.families import batch, model_and_processor


def _untouched(model, hooks_before):
    assert not vtprune.is_pruned(model)
    assert "generate" not in model.__dict__
    assert dict(model._forward_pre_hooks) == hooks_before
    assert model.config.vision_config._attn_implementation == "sdpa"


BAD_PRUNE = [
    (dict(method="nope", keep=4), ["'nope'", "divprune", "fastervlm"]),
    (dict(method="divprune", keep=0), ["keep", "0"]),
    (dict(method="divprune", keep=-3), ["keep", "-3"]),
    (dict(method="divprune", keep=4.5), ["keep", "4.5"]),
    (dict(method="divprune", keep=True), ["keep", "True"]),
    (dict(method="divprune", keep=4, keep_ratio=0.5), ["keep", "keep_ratio", "not both"]),
    (dict(method="divprune", keep_ratio=1.5), ["keep_ratio", "1.5", "(0, 1]"]),
    (dict(method="divprune", keep_ratio=0.0), ["keep_ratio", "0.0"]),
    (dict(method="divprune"), ["keep", "keep_ratio"]),
    (dict(method="divprune", keep=4, colour="red"), ["colour", "valid options"]),
    (dict(method="divprune", keep=4, positions="shuffle"), ["positions", "'shuffle'", "preserve", "compact"]),
    (dict(keep=4), ["method", "divprune"]),
]


def assert_prune_refused(kwargs: dict, words: list[str]) -> None:
    """prune(**kwargs) on a fresh tiny LLaVA raises a ValueError holding every one of ``words``, and the model is
    left exactly as it was."""
    model, _ = model_and_processor("llava")
    hooks = dict(model._forward_pre_hooks)
    with pytest.raises(ValueError) as e:
        vtprune.prune(model, **kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    _untouched(model, hooks)


@pytest.mark.parametrize("kwargs,words", BAD_PRUNE)
def test_bad_prune_arguments_raise_and_leave_model_untouched(kwargs, words):
    assert_prune_refused(kwargs, words)


BAD_STAGES = [
    (dict(method="fastv", keep=4, layer=5), "llm:5 is past the last decoder layer.*valid layers 1..1"),
    (dict(method="fastv", keep=4, layer=0), "layer must be an int ≥ 1.*0"),
    (dict(method="fastervlm", keep=4, layer=1), "'fastervlm' cannot run at stage 'llm:1'.*pre_llm"),
    (dict(method="globalcom2", keep=4), "'globalcom2' needs the signal.*coords"),
    (dict(method="pdrop", keep=4), "'pdrop' takes its budgets from schedule"),
    (dict(method="fastv", keep=4, layer=1, positions="compact"), "compact.*pre_llm stage only"),
    (dict(stages=[{"method": "fastv", "keep": 4, "layer": 1}, {"method": "divprune", "keep": 8}]),
     "pre_llm stage must come first"),
]


@pytest.mark.parametrize("kwargs,match", BAD_STAGES)
def test_bad_stage_arguments_raise_and_leave_model_untouched(kwargs, match):
    model, _ = model_and_processor("llava")  # 2 decoder layers
    hooks = dict(model._forward_pre_hooks)
    with pytest.raises(ValueError, match=match):
        vtprune.prune(model, **kwargs)
    _untouched(model, hooks)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_text_only_model_is_an_unsupported_family():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM._from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="unsupported model family 'llama'.*llava"):
        vtprune.prune(model, method="divprune", keep=4)
    assert not vtprune.is_pruned(model) and "generate" not in model.__dict__


def test_not_a_model():
    with pytest.raises(ValueError, match="transformers model"):
        vtprune.prune(torch.nn.Linear(2, 2), method="divprune", keep=4)


def test_pruning_twice_raises():
    model, _ = model_and_processor("llava")
    vtprune.prune(model, method="divprune", keep=4)
    with pytest.raises(ValueError, match="already pruned.*unprune"):
        vtprune.prune(model, method="random", keep=4)
    assert vtprune.last_report(model) is None  # the first prune is intact and unused so far


def test_unprune_and_report_on_unpruned_model_raise():
    model, _ = model_and_processor("llava")
    with pytest.raises(ValueError, match="not pruned"):
        vtprune.unprune(model)
    with pytest.raises(ValueError, match="not pruned"):
        vtprune.last_report(model)


def test_fastervlm_on_a_tower_without_cls():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    cfg = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2, image_size=28, patch_size=14),
                      text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
                      image_token_id=63, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration._from_config(cfg)
    with pytest.raises(ValueError, match="fastervlm.*no \\[CLS\\].*divprune"):
        vtprune.prune(model, method="fastervlm", keep=2)
    assert not vtprune.is_pruned(model)


def test_image_count_mismatch_raises_and_model_still_works():
    model, proc = model_and_processor("llava")
    good = batch("llava", [0])
    vtprune.prune(model, method="divprune", keep=4)
    bad = dict(good)
    bad["pixel_values"] = torch.cat([good["pixel_values"]] * 2)  # two images, one placeholder run
    with pytest.raises(ValueError, match="2 images were given.*placeholder"):
        model(**bad)
    with torch.no_grad():
        model(**good)
    assert vtprune.last_report(model).images[0].n_after == 4


def test_inputs_embeds_with_images_is_a_clear_error():
    model, _ = model_and_processor("llava")
    inputs = batch("llava", [0])
    vtprune.prune(model, method="divprune", keep=4)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="needs input_ids.*disabled"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])


def test_select_tokens_errors():
    f = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="cls_attention"):
        vtprune.select_tokens("fastervlm", f, keep=4)
    with pytest.raises(ValueError, match="rank 3"):
        vtprune.select_tokens("divprune", f[0], keep=4)
    with pytest.raises(ValueError, match="unknown method 'x'.*divprune"):
        vtprune.select_tokens("x", f, keep=4)


def test_select_tokens_runs_each_method():
    f = torch.randn(2, 16, 8)
    a = torch.rand(2, 16)
    for m in vtprune.list_methods():
        if m == "globalcom2":  # needs a thumbnail + crops layout: covered in tests/test_holov_globalcom2.py
            continue
        idx = vtprune.select_tokens(m, f, keep=5, cls_attention=a, text_attention=a, layer_attention=a,
                                    vflow_importance=a, prefill_attention=a, action_attention=a, grid=(4, 4),
                                    flow_stats=torch.rand(2, 3, 16))
        # a LongTensor for every method, merging ones too (the README's promise); vflowopt's merged tokens come with
        # a pruned model's forward
        assert isinstance(idx, torch.Tensor) and idx.shape == (2, 5) and idx.dtype == torch.long
        if m in ("atp", "vflowopt"):  # adaptive: fewer than keep allowed, padded with -1 at the end
            for row in idx:
                kept = row[row >= 0]
                assert kept.numel() >= 1 and (row[kept.numel():] == -1).all() and (kept.diff() > 0).all()
            continue
        assert (idx.diff(dim=1) > 0).all()
    assert torch.equal(vtprune.select_tokens("fastervlm", f, 5, cls_attention=a),
                       a.topk(5).indices.sort().values)


def test_config_json_round_trip_and_equivalence():
    cfg = vtprune.PruneConfig.from_dict({"method": "random", "keep_ratio": 0.25, "positions": "compact", "seed": 7})
    d = json.loads(json.dumps(cfg.to_dict()))
    again = vtprune.PruneConfig.from_dict(d)
    assert again == cfg and again.to_json() == cfg.to_json()
    assert cfg.stages[0].budget(576) == 144 and cfg.stages[0].budget(3) == 1
    with pytest.raises(ValueError, match="unknown config key"):
        vtprune.PruneConfig.from_dict({"stages": [], "colour": 1})

    model, _ = model_and_processor("llava")
    inputs = batch("llava", [0])
    vtprune.prune(model, vtprune.PruneConfig.from_dict({"method": "divprune", "keep": 5}))
    with torch.no_grad():
        a = model(**inputs).logits
    vtprune.unprune(model)
    vtprune.prune(model, method="divprune", keep=5)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, a)


def test_import_is_lean():
    code = ("import sys, vtprune; bad = [m for m in sys.modules if m == 'triton' or m.startswith('triton.') "
            "or m.startswith('transformers.models.') or m == 'vtprune.adapters.llava']; "
            "import torch; print(bad, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False"


def test_public_api_surface():
    assert set(vtprune.__all__) >= {"prune", "unprune", "is_pruned", "disabled", "last_report", "select_tokens",
                                    "list_methods", "supported_models", "PruneConfig"}
    assert vtprune.list_methods() == ["atp", "divprune", "fastervlm", "fastv", "flowcut", "globalcom2", "holov",
                                      "pdrop", "random", "uniform", "vflowopt", "vla_pruner"]
    families = vtprune.supported_models()  # family files add themselves (registry); the first five are always there
    assert families == sorted(families)
    assert {"internvl", "llava", "llava_next", "qwen2_5_vl", "qwen2_vl"} <= set(families)


def test_every_supported_family_has_a_tiny_model_and_a_prompt_layout():
    """The test matrix comes from the registry: a family without a tiny builder would silently miss every test."""
    from tests.families import MISSING

    assert not MISSING, f"no vtprune.testing TinyFamily for {MISSING}: add one in vtprune/testing/<family>.py"
    for family in vtprune.supported_models():
        cls = vtprune.registry.get_adapter_class(family)
        assert "{img}" in cls.prompt and "{q}" in cls.prompt and cls.placeholder
