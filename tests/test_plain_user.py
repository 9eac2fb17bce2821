"""Plain user code on every family × method (issue 14): the calls people write in their first minute.

No ``torch.no_grad()`` unless a user would write it, parameters that require grad, default ``generate`` arguments,
then ``use_cache=False``, beams, seeded sampling with several return sequences, dict outputs, stop strings, a
``deepcopy``, two threads on one model, a reused KV cache, a grad-enabled training forward. Models have 3 decoder
layers (FastV's default layer 2 and the default schedules fit) and 3 ViT layers (in-tower FlowCut has a layer to
prune after). Each test checks real behaviour against the same model's own results.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import vtprune
from tests.families import FAMILIES, batch, generated, in_llm, mixes_attention_types, model_and_processor
from vtprune.adapters.llm import EPISODE_SIGNALS
from vtprune.call import output_cache
from vtprune.registry import get_selector

# in-LLM stages refuse language models mixing attention types (Gemma 3; tests/test_llm_stages.py checks the refusal);
# methods that learn from decoded actions over an episode (vla_pruner) have their policy tests: tests/test_vla_policy.py
CASES = [(f, m) for f in FAMILIES for m in vtprune.list_methods() if (m != "globalcom2" or f == "llava_next")
         and not (mixes_attention_types(f) and in_llm(f, m))
         and not set(get_selector(m).requires) & set(EPISODE_SIGNALS)]
SCHEDULED = ("pdrop", "atp")  # methods whose default is a multi-stage schedule, not a keep count


def _model(family: str):
    return model_and_processor(family, text_layers=3, vision_layers=3)


def _prune(model, method: str):
    """The call a user writes: the method's defaults, a budget where it takes one."""
    return vtprune.prune(model, method=method) if method in SCHEDULED else vtprune.prune(model, method=method, keep=6)


def _gen(model) -> dict:
    # random weights may emit the image placeholder (no model accepts it back as text) or EOS in one run but not in
    # another: suppress both so every run yields exactly max_new_tokens
    return {"max_new_tokens": 4, "suppress_tokens": [model.config.image_token_id, 2]}


def _continued(model, inputs, ids: torch.Tensor) -> dict:
    """inputs for a prompt extended by the tokens after it (generate's own rule for the mask and token types: mask 1,
    text; PaliGemma: the causal suffix type)."""
    return {**generated(model, inputs, ids.shape[1] - inputs["input_ids"].shape[1]), "input_ids": ids}


@pytest.mark.parametrize("family,method", CASES)
def test_generate_the_way_users_call_it(family, method):
    model, proc = _model(family)
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    inputs = batch(family, [0, 1])
    ids, length = inputs["input_ids"], inputs["input_ids"].shape[1]
    _prune(model, method)
    gen = _gen(model)

    out = model.generate(**inputs, **gen)  # gradients on, as the README quickstart does it
    assert out.shape == (2, length + 4) and torch.equal(out[:, :length], ids)
    rep = vtprune.last_report(model)
    assert rep is not None and rep.visual_after < rep.visual_before

    assert torch.equal(model.generate(**inputs, use_cache=False, **gen), out)

    beams = model.generate(**inputs, num_beams=2, **gen)
    assert beams.shape == (2, length + 4) and torch.equal(beams[:, :length], ids)

    torch.manual_seed(0)
    s1 = model.generate(**inputs, do_sample=True, num_return_sequences=3, **gen)
    torch.manual_seed(0)
    s2 = model.generate(**inputs, do_sample=True, num_return_sequences=3, **gen)
    assert s1.shape == (6, length + 4) and torch.equal(s1, s2)
    assert torch.equal(s1[:, :length], ids.repeat_interleave(3, 0))

    d = model.generate(**inputs, return_dict_in_generate=True, output_scores=True, output_logits=True, **gen)
    assert torch.equal(d.sequences, out) and len(d.scores) == 4 and len(d.logits) == 4

    longer = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, suppress_tokens=[model.config.image_token_id])
    assert longer.shape == (2, length + 6)

    stopped = model.generate(**inputs, stop_strings=["\n"], tokenizer=proc.tokenizer, **gen)
    assert torch.equal(stopped[:, :length], ids) and stopped.shape[1] <= length + 4
    assert torch.equal(stopped[:, length], out[:, length])  # the first new token comes before any stop


def _vision_grads(model) -> list[str]:
    names = ("multi_modal_projector", "visual.merger", "vision_tower", "visual.", "vision_model", "connector")
    return [n for n, p in model.named_parameters()
            if any(k in n for k in names) and p.grad is not None and bool(p.grad.abs().sum() > 0)]


@pytest.mark.parametrize("family,method", CASES)
def test_training_forward_with_gradients(family, method):
    model, _ = _model(family)
    inputs = batch(family, [0, 1])
    _prune(model, method)
    in_llm = any(s.layer is not None for s in model._vtprune_state.config.stages)
    if in_llm:  # logits cover only the kept tokens inside the LLM: labels are refused with a clear error
        with pytest.raises(ValueError, match="labels are not supported with in-LLM stages"):
            model(**inputs, labels=inputs["input_ids"])
        out = model(**inputs)
        loss = out.logits.float().logsumexp(-1).mean()
    else:
        out = model(**inputs, labels=inputs["input_ids"])
        loss = out.loss
    assert out.logits.requires_grad
    loss.backward()
    lm_grads = [p.grad for p in model.get_decoder().parameters() if p.grad is not None]
    assert lm_grads and any(bool(g.abs().sum() > 0) for g in lm_grads)
    assert _vision_grads(model), "the kept visual features must stay differentiable"


@pytest.mark.parametrize("family,method", CASES)
def test_deepcopy_and_two_threads(family, method):
    model, _ = _model(family)
    inputs = batch(family, [0, 1])
    _prune(model, method)
    gen = _gen(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_kept = [im.kept for im in vtprune.last_report(model).images]
    ref_ids = model.generate(**inputs, **gen)
    ref_rep = vtprune.last_report(model)

    twin = copy.deepcopy(model)
    assert vtprune.is_pruned(twin) and vtprune.last_report(twin) is None
    assert torch.equal(twin.generate(**inputs, **gen), ref_ids)
    assert vtprune.last_report(twin) is not None and vtprune.last_report(model) is ref_rep  # the twin's own report
    vtprune.unprune(twin)
    with torch.no_grad(), vtprune.disabled(model):
        unpruned = model(**inputs).logits
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, unpruned)
        assert torch.equal(model(**inputs).logits, ref)  # the original is still pruned
    assert vtprune.is_pruned(model) and not vtprune.is_pruned(twin)

    # two threads at once on one model: one runs forwards on this batch, the other generates for another prompt
    other = batch(family, [2])
    other_ids = model.generate(**other, **gen)
    other_kept = [im.kept for im in vtprune.last_report(model).images]
    results: dict = {}

    def work(t: int) -> None:
        for r in range(3):
            if t == 0:
                with torch.no_grad():
                    out = model(**inputs).logits
            else:
                out = model.generate(**other, **gen)
            results[(t, r)] = (out, [im.kept for im in vtprune.last_report(model).images])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    for (t, _), (out, kept) in results.items():
        assert torch.equal(out, ref if t == 0 else other_ids)
        assert all(torch.equal(a, b) for a, b in zip(kept, ref_kept if t == 0 else other_kept, strict=True))


@pytest.mark.parametrize("family,method", CASES)
def test_reused_cache(family, method):
    model, proc = _model(family)
    inputs = batch(family, [0, 1])
    _prune(model, method)
    gen = {**_gen(model), "max_new_tokens": 3}
    first = model.generate(**inputs, return_dict_in_generate=True, **gen)
    cache = output_cache(first)
    in_one_call = model.generate(**inputs, **{**gen, "max_new_tokens": 6})
    # continuing generation from the cache is the same as generating further in one call
    more = model.generate(**_continued(model, inputs, first.sequences), past_key_values=copy.deepcopy(cache), **gen)
    assert torch.equal(more, in_one_call)
    # multi-turn chat: the next user turn after the answer, on the same cache
    turn = proc.tokenizer([" yes no"] * 2, return_tensors="pt", add_special_tokens=False).input_ids
    conversation = _continued(model, inputs, torch.cat([first.sequences, turn], 1))
    answer = model.generate(**conversation, past_key_values=copy.deepcopy(cache), **gen)
    n = conversation["input_ids"].shape[1]
    assert answer.shape == (2, n + 3) and torch.equal(answer[:, :n], conversation["input_ids"])
    spec = get_selector(method)
    if not spec.text_guided and method != "flowcut":
        # text-agnostic and before the LLM: the image keeps the same tokens, so a fresh run agrees
        assert torch.equal(answer, model.generate(**conversation, **gen))
    other = batch(family, [2, 1])  # another prompt, followed by this cache's answer, on this cache
    other_ids = torch.cat([other["input_ids"], first.sequences[:, inputs["input_ids"].shape[1]:]], 1)
    with pytest.raises(ValueError, match="whole conversation"):
        model.generate(**_continued(model, other, other_ids), past_key_values=cache, **gen)


BAD_OPTIONS = [
    ("vflowopt", {"keep": 4, "cells": -1}), ("holov", {"keep": 4, "crops": 0}), ("holov", {"keep": 4, "within": "x"}),
    ("atp", {"mass": -1}), ("flowcut", {"keep": 4, "decay": "a"}), ("flowcut", {"keep": 4, "decay": 5.0}),
    ("pdrop", {"schedule": "x"}), ("divprune", {"keep": 4, "seed": 2**70}), ("fastv", {"keep": 0}),
]


@pytest.mark.parametrize("method,kwargs", BAD_OPTIONS)
def test_bad_options_fail_at_prune_time(method, kwargs):
    model, _ = _model("llava")
    inputs = batch("llava", [0])
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(ValueError, match=repr(next(v for k, v in kwargs.items() if k != "keep" or v == 0))[:8]):
        vtprune.prune(model, method=method, **kwargs)
    assert not vtprune.is_pruned(model) and "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


@pytest.mark.parametrize("family,method", [(f, "divprune") for f in FAMILIES] + [("llava", m) for f, m in CASES
                                                                                  if f == "llava"])
def test_non_finite_pixels_behave_like_the_unpruned_model(family, method):
    model, _ = _model(family)
    inputs = batch(family, [0, 1])
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"].view(-1)[:7] = float("nan")
    with torch.no_grad():
        unpruned = model(**inputs).logits
    _prune(model, method)
    with torch.no_grad():
        pruned = model(**inputs).logits  # the unpruned model returns (partly) NaN logits: no error here either
    assert pruned.shape[0] == unpruned.shape[0] and bool(torch.isnan(unpruned).any())
    # pruning never brings a NaN in (it may drop every non-finite token, as some selectors rank them last)
    assert not bool(torch.isnan(pruned[1]).any()) or bool(torch.isnan(unpruned[1]).any())
    for im in vtprune.last_report(model).images:
        assert im.kept.unique().numel() == im.n_after and bool((im.kept.diff() > 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_that_would_skip_pruning_say_so(family):
    model, _ = _model(family)
    inputs = batch(family, [0, 1])
    _prune(model, "divprune")
    with torch.no_grad():
        model(**inputs)
    assert vtprune.last_report(model) is not None
    for call in (lambda: model.forward(**inputs), lambda: model.model(**inputs),
                 lambda: type(model).generate(model, **inputs, max_new_tokens=2)):
        with pytest.raises(ValueError, match="model.generate"):
            call()
    with torch.no_grad():
        feats = model.model.get_image_features(
            **{k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")},
            return_dict=True)
    enc = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_sizes", "image_grid_thw")}
    with pytest.raises(ValueError, match="mm_encoder_outputs"):
        model(**enc, mm_encoder_outputs={"image": feats})
    with vtprune.disabled(model), torch.no_grad():  # the documented way to mean "unpruned"
        model.forward(**inputs)
    # a text-only call: last_report describes it (nothing pruned), not the earlier call
    text = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    text = {"input_ids": text["input_ids"][:, -3:], "attention_mask": text["attention_mask"][:, -3:]}
    with torch.no_grad():
        model(**text)
    assert vtprune.last_report(model) is None
    # a prefill continuing a cache that holds unpruned tokens and brings an image
    with torch.no_grad():
        head = model(input_ids=inputs["input_ids"][:, :1], attention_mask=inputs["attention_mask"][:, :1],
                     use_cache=True)
        rest = {k: (v[:, 1:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                for k, v in inputs.items()}
        rest["attention_mask"] = inputs["attention_mask"]
        with pytest.raises(ValueError, match="continues a KV cache"):
            model(**rest, past_key_values=output_cache(head))


def test_in_llm_stage_refuses_inputs_embeds_and_compile_is_refused():
    model, _ = _model("llava")
    inputs = batch("llava", [0])
    with pytest.raises(ValueError, match="torch.compile"):
        vtprune.prune(torch.compile(model), method="fastv", keep=4)
    assert not vtprune.is_pruned(model)
    vtprune.prune(model, method="fastv", keep=4)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_unprune_keeps_an_attention_choice_made_after_prune():
    model, _ = _model("llava")
    vtprune.prune(model, method="fastervlm", keep=4)
    assert model.config.vision_config._attn_implementation.startswith("vtprune_probe+")
    model.set_attn_implementation({"vision_config": "eager"})
    vtprune.unprune(model)
    assert model.config.vision_config._attn_implementation == "eager"


@pytest.mark.parametrize("family", FAMILIES)
def test_pickled_pruned_model_prunes_itself(family):
    import pickle

    model, _ = _model(family)
    inputs = batch(family, [0, 1])
    # the in-LLM probe is a registered attention function, named in the pickled config (where in-LLM stages run;
    # else the vision-tower probe, named there too)
    _prune(model, "fastervlm" if mixes_attention_types(family) else "fastv")
    with torch.no_grad():
        ref = model(**inputs).logits
    twin_of_unpruned = copy.deepcopy(model)  # after a forward, as the pruned model is
    vtprune.unprune(twin_of_unpruned)
    try:
        pickle.dumps(twin_of_unpruned)
    except Exception as e:  # transformers' own hooks may make a model unpicklable after a forward: vtprune adds none
        with pytest.raises(type(e)):
            pickle.dumps(model)
        return
    loaded = pickle.loads(pickle.dumps(model))
    assert vtprune.is_pruned(loaded) and loaded.generate.model is loaded
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, ref)
    assert vtprune.last_report(loaded) is not None


def test_compiling_a_pruned_model_still_prunes():
    """The order the refusal above recommends: prune, then torch.compile (dynamo traces through the hooks, breaking
    the graph where vtprune reads values on the host). The eager backend keeps the check about tracing, not codegen."""
    model, _ = _model("llava")
    inputs = batch("llava", [0, 1])
    _prune(model, "divprune")
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend="eager")(**inputs).logits
    assert torch.equal(out, ref) and vtprune.last_report(model).visual_after == 12
