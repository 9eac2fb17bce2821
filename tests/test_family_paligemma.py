"""PaliGemma / Gemma 3 specifics: the prefix-LM mask, sliding-window layers, 1-based positions, pan-and-scan crops,
back-to-back images, the substitute signal and which methods run.

The masks are read where they matter, on what the language model receives (a forward pre-hook on it): after pruning it
is the unpruned model's mask restricted to the kept tokens (image tokens and the prefix bidirectional, the suffix
causal); Gemma 3's sliding-window layers additionally count their window over the kept tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtprune
from tests.families import batch, eager_vision_copy, lm_call, model_and_processor, prompt, reference_mask
from vtprune.adapters.llm import EPISODE_SIGNALS
from vtprune.registry import get_adapter_class, get_selector
from vtprune.testing import tiny_image

FAMILIES = ["paligemma", "gemma3"]


def _masks(mask) -> dict[str, torch.Tensor]:
    """{layer type: BoolTensor[B, L, L] "may attend"} of a mask the language model received (sdpa: boolean)."""
    out = mask if isinstance(mask, dict) else {"full_attention": mask}
    assert all(m.dtype == torch.bool for m in out.values())
    return {k: m[:, 0] for k, m in out.items()}


def _restrict(full: torch.Tensor, tm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [B, L, L] mask ``full`` on the pruned sequence's rows and columns (token map ``tm`` [B, L']) and where both
    the row and the column are tokens of the caller's sequence (not padding vtprune added)."""
    idx = tm.clamp(min=0)
    r = full.gather(1, idx[:, :, None].expand(-1, -1, full.shape[2]))
    r = r.gather(2, idx[:, None, :].expand(-1, idx.shape[1], -1))
    real = tm >= 0
    return r, real[:, :, None] & real[:, None, :]


def _suffix_inputs(proc, family_prompts, suffixes):
    """PaliGemma's training layout: prefix (images, prompt: type 0), suffix (type 1), the processor's labels."""
    imgs = [tiny_image(60, 60, seed=s) for s in range(len(family_prompts))]
    return proc(images=imgs, text=family_prompts, suffix=suffixes, return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", ["divprune", "fastervlm"])
def test_paligemma_prefix_lm_mask_is_the_unpruned_one_on_the_kept_tokens(method):
    """A left-padded batch with a suffix: the mask the language model receives after pruning equals the unpruned
    mask restricted to the kept tokens, and it is the prefix-LM rule itself (prefix and kept image tokens attend both
    ways, the suffix causally, the prefix never to the suffix); the logits equal the unpruned model's with the dropped
    image tokens masked out, and so does the loss on the processor's own labels."""
    model, proc = model_and_processor("paligemma")
    inputs = _suffix_inputs(proc, [prompt("paligemma", q) for q in ("what colour is it?", "where?")],
                            ["a red square", "top left"])
    types = inputs["token_type_ids"]
    assert bool((types == 1).any()) and bool((types == 0).any())
    full_kw, _ = lm_call(model, inputs)
    vtprune.prune(model, method=method, keep=5)
    kw, logits = lm_call(model, inputs)
    rep = vtprune.last_report(model)
    assert rep.visual_after == 2 * 5 < rep.visual_before
    tm = rep.token_map
    restricted, real = _restrict(_masks(full_kw["attention_mask"])["full_attention"], tm)
    got = _masks(kw["attention_mask"])["full_attention"]
    assert torch.equal(got[real], restricted[real])
    # the rule, on the pruned sequence: real tokens only (the caller's padding and vtprune's are masked columns)
    t = types.gather(1, tm.clamp(min=0))
    valid = inputs["attention_mask"].gather(1, tm.clamp(min=0)).bool() & (tm >= 0)
    n = tm.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    rule = (causal | ((t[:, :, None] == 0) & (t[:, None, :] == 0))) & valid[:, None, :]
    rows = valid[:, :, None] & torch.ones_like(rule)
    assert torch.equal(got[rows], rule[rows])
    # logits and loss: the unpruned model on the full sequence, dropped image tokens masked, the same positions
    keep = torch.zeros_like(types, dtype=torch.bool)
    for b in range(tm.shape[0]):
        keep[b, tm[b][tm[b] >= 0]] = True
    mask = inputs["attention_mask"] * keep
    pos = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0) + 1
    with vtprune.disabled(model), torch.no_grad():
        ref = model(**{**inputs, "attention_mask": mask, "position_ids": pos})
    with torch.no_grad():
        out = model(**inputs, position_ids=pos)
    for b in range(tm.shape[0]):
        sel = tm[b] >= 0
        torch.testing.assert_close(out.logits[b, sel], ref.logits[b, tm[b][sel]], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)


def test_gemma3_masks_full_layers_restricted_sliding_window_over_the_kept_tokens():
    """Gemma 3: image tokens attend bidirectionally within their image, text causally. After pruning, the
    full-attention layers get the unpruned mask restricted to the kept tokens; the sliding-window layers get that mask
    limited to keys fewer than ``sliding_window`` tokens back in the sequence the model receives (the window counts
    kept tokens, as the sliding cache does when decoding): it reaches further back than the unpruned window did."""
    model, _ = model_and_processor("gemma3")
    assert set(model.config.text_config.layer_types) == {"sliding_attention", "full_attention"}
    w = model.config.text_config.sliding_window
    inputs = batch("gemma3", [0, 1, 2])
    full_kw, _ = lm_call(model, inputs)
    unpruned = _masks(full_kw["attention_mask"])
    vtprune.prune(model, method="divprune", keep=4)
    kw, logits = lm_call(model, inputs)
    tm = vtprune.last_report(model).token_map
    got = _masks(kw["attention_mask"])
    full, real = _restrict(unpruned["full_attention"], tm)
    assert torch.equal(got["full_attention"][real], full[real])
    # bidirectional inside each kept image: the first kept image token sees the last one
    img = (inputs["input_ids"].gather(1, tm.clamp(min=0)) == model.config.image_token_id) & (tm >= 0)
    first, last = img.float().argmax(1), img.shape[1] - 1 - img.flip(1).float().argmax(1)
    assert bool(got["full_attention"][torch.arange(3), first, last].all())
    n = tm.shape[1]
    near = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) < w
    assert torch.equal(got["sliding_attention"][real], (full & near)[real])
    old_sliding, _ = _restrict(unpruned["sliding_attention"], tm)
    assert bool((got["sliding_attention"] & ~old_sliding & real).any())  # the window reaches further back
    # the logits are those of the unpruned model with the window counted the same way (tests/families.reference_mask)
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b in range(3):
        keep[b, tm[b][tm[b] >= 0]] = True
    mask = inputs["attention_mask"] * keep
    pos = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with vtprune.disabled(model), torch.no_grad():
        ref = model(**{**inputs, "attention_mask": reference_mask(model, inputs, mask), "position_ids": pos}).logits
    with torch.no_grad():
        out = model(**inputs, position_ids=pos).logits
    for b in range(3):
        sel = tm[b] >= 0
        torch.testing.assert_close(out[b, sel], ref[b, tm[b][sel]], rtol=0, atol=1e-5)


def test_paligemma_positions_are_1_based_and_continue_across_kinds_of_calls():
    """Forward positions count from 1, as PaliGemma's own forward does; generate's are the unpruned generate's. A cache
    filled by a pruned forward and continued by generate, or filled by generate and continued by the caller's own
    forward loop, gives what one generate call gives."""
    model, _ = model_and_processor("paligemma")
    inputs = batch("paligemma", [1])
    vtprune.prune(model, method="divprune", keep=5)
    kw, _ = lm_call(model, inputs)
    tm = vtprune.last_report(model).token_map
    assert torch.equal(kw["position_ids"], tm + 1)
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True,
               suppress_tokens=[model.config.image_token_id, 2])
    with torch.no_grad():
        one = model.generate(**inputs, **gen)
        out = model(**inputs, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(tok[0], one.sequences[0, -4:-3])
        cont = {**inputs, "input_ids": torch.cat([inputs["input_ids"], tok], 1),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tok)], 1),
                "token_type_ids": torch.cat([inputs["token_type_ids"], torch.ones_like(tok)], 1)}
        more = model.generate(**cont, cache=out.cache, **{**gen, "max_new_tokens": 3})
        torch.testing.assert_close(torch.stack(more.logits), torch.stack(one.logits[1:]), rtol=0, atol=1e-5)
        first = model.generate(**inputs, **{**gen, "max_new_tokens": 1})
        step = model(input_ids=tok, attention_mask=cont["attention_mask"], cache=first.cache, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], one.logits[1], rtol=0, atol=1e-5)


def test_paligemma_back_to_back_images_get_their_own_budgets():
    """PaliGemma's processor puts several images back to back (one placeholder run): each image is its own 16 tokens,
    before the LLM and inside it."""
    model, proc = model_and_processor("paligemma", text_layers=3)
    imgs = [tiny_image(60, 60, seed=1), tiny_image(80, 60, seed=2)]
    inputs = proc(images=[imgs], text=["<image><image>compare them"], return_tensors="pt")
    inputs.pop("labels")
    ids = inputs["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().flatten()
    assert img.tolist() == list(range(32))  # one run
    index = get_adapter_class("paligemma")(model).image_index(inputs["input_ids"])[0]
    assert index[:32].tolist() == [0] * 16 + [1] * 16 and bool((index[32:] == -1).all())
    compose = dict(stages=[{"method": "divprune", "keep": 6}, {"method": "fastv", "keep": 3, "layer": 2}])
    for cfg, expect in ((dict(method="divprune", keep=3), [(0, 16, 3), (1, 16, 3)]),
                        (dict(method="fastv", keep=3, layer=2), [(0, 16, 3), (1, 16, 3)]),
                        (compose, [(0, 16, 6), (1, 16, 6), (0, 6, 3), (1, 6, 3)])):
        pruned = vtprune.prune(copy.deepcopy(model), **cfg)
        with torch.no_grad():
            pruned(**inputs)
        assert [(e.image, e.n_before, e.n_after) for e in vtprune.last_report(pruned).images] == expect


def test_gemma3_pan_and_scan_crops_are_images_of_their_own():
    """With pan-and-scan on, the processor adds crops, each a separate image to the model (its own run between
    begin/end-of-image tokens, its own row of pixel_values, its own bidirectional block): each keeps its own budget,
    and the result equals the unpruned model with the dropped tokens masked."""
    model, proc = model_and_processor("gemma3")
    inputs = proc(images=[[tiny_image(300, 80, seed=4)]], text=[prompt("gemma3", "what is it?")], return_tensors="pt",
                  do_pan_and_scan=True, pan_and_scan_min_crop_size=28, pan_and_scan_max_num_crops=3)
    n_images = inputs["pixel_values"].shape[0]
    assert n_images > 1
    vtprune.prune(model, method="fastervlm", keep=5)
    with torch.no_grad():
        out = model(**inputs).logits
    rep = vtprune.last_report(model)
    assert [(e.image, e.n_after) for e in rep.images] == [(i, 5) for i in range(n_images)]
    tm = rep.token_map[0]
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, tm] = True
    mask = inputs["attention_mask"] * keep
    with vtprune.disabled(model), torch.no_grad():
        ref = model(**{**inputs, "attention_mask": reference_mask(model, inputs, mask)}).logits
    torch.testing.assert_close(out[0], ref[0, tm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_substitute_signal_is_the_received_attention_of_the_last_siglip_layer(family):
    """SigLIP has no [CLS]: fastervlm ranks each LLM token by the attention its patches receive in the last SigLIP
    layer (mean over the image's queries, head mean; Gemma 3 sums each 2x2 pooling window), re-derived here from an
    eager run; the report says it is a substitute."""
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    with torch.no_grad():
        att = eager_vision_copy(model).model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    score = att.float().mean(1).mean(1)  # [images, patches]
    side = int(score.shape[1] ** 0.5)
    k = 2 if family == "gemma3" else 1
    score = score.view(-1, side // k, k, side // k, k).sum((2, 4)).flatten(1)
    vtprune.prune(model, method="fastervlm", keep=5)
    with torch.no_grad():
        model(**inputs)
    for i, e in enumerate(vtprune.last_report(model).images):
        assert torch.equal(e.kept, score[i].topk(5).indices.sort().values)
        assert "substitute" in e.signal and "[CLS]" in e.signal


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_or_is_refused_clearly(family):
    """PaliGemma runs every method but globalcom2 (no crop layout or [CLS] logits); Gemma 3 runs every pre-LLM method
    but globalcom2, and refuses the in-LLM ones (fastv, pdrop, atp, flowcut's LLM stage) because its language model
    mixes sliding-window and full layers. A training-style call with the processor's own labels works before the LLM
    and is refused clearly inside it."""
    model, proc = model_and_processor(family, text_layers=3)
    inputs = batch(family, [0, 1])
    ran, refused = [], {}
    # methods that learn from decoded actions over an episode (vla_pruner): tests/test_vla_policy.py
    methods = [m for m in vtprune.list_methods() if not set(get_selector(m).requires) & set(EPISODE_SIGNALS)]
    for method in methods:
        kw = {} if method in ("pdrop", "atp") else {"keep": 4}
        try:
            pruned = vtprune.prune(copy.deepcopy(model), method=method, **kw)
        except ValueError as e:
            refused[method] = str(e)
            continue
        with torch.no_grad():
            out = pruned(**inputs).logits
        assert out.shape[1] < inputs["input_ids"].shape[1] and vtprune.last_report(pruned).visual_after < 32
        ran.append(method)
    llm = {"fastv", "pdrop", "atp", "flowcut"}
    assert "crop_ids" in refused.pop("globalcom2")
    if family == "gemma3":
        assert set(refused) == llm and all("this model mixes" in m for m in refused.values())
    else:
        assert not refused
    assert set(ran) == set(methods) - {"globalcom2"} - (llm if family == "gemma3" else set())
    if family == "paligemma":  # the processor's backward-compatible labels (all -100 without a suffix)
        full = proc(images=[tiny_image(60, 60)], text=[prompt(family, "what?")], return_tensors="pt")
        assert "labels" in full
        with torch.no_grad():
            assert vtprune.prune(copy.deepcopy(model), method="divprune", keep=4)(**full).logits.shape[1] < \
                full["input_ids"].shape[1]
        with pytest.raises(ValueError, match="labels are not supported with in-LLM stages"):
            vtprune.prune(copy.deepcopy(model), method="fastv", keep=4)(**full)
