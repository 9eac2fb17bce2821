"""Qwen3-VL / Qwen3-VL-MoE: DeepStack features follow the kept tokens (pre_llm and llm:K stages), 3-D positions of
kept tokens, the received-attention substitute signal, family errors."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import AttentionInterface

import vtprune
from tests.families import batch, forward_positions, model_and_processor

FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]


def _record(model):
    """Per language-model call: its DeepStack inputs and the hidden states entering decoder layer 1 (that is, layer 0's
    output plus the first DeepStack features)."""
    lm = model.model.language_model
    seen: dict[str, list] = {"ds": [], "h1": []}
    handles = [lm.register_forward_pre_hook(lambda m, a, kw: seen["ds"].append(
        (kw["visual_pos_masks"], kw["deepstack_visual_embeds"])), with_kwargs=True),
        lm.layers[1].register_forward_pre_hook(lambda m, a: seen["h1"].append(a[0].clone()))]
    return seen, handles


def _slots(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> the DeepStack feature row of every visual position (the model concatenates them row-major)."""
    return (mask.flatten().long().cumsum(0) - 1).view_as(mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_deepstack_pruned_equals_masked_full_sequence(family):
    """Pruned (pre_llm) == the unpruned model on the full sequence with dropped image tokens masked out and the
    unpruned positions; the DeepStack rows the language model gets are the kept tokens' own, added at their rows."""
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 2])  # two image sizes, left padding
    vtprune.prune(model, method="divprune", keep=5)
    seen, handles = _record(model)
    with torch.no_grad():
        pruned = model(**inputs).logits
    rep = vtprune.last_report(model)
    tm = rep.token_map
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b in range(tm.shape[0]):
        keep[b, tm[b][tm[b] >= 0]] = True
    mask = inputs["attention_mask"] * keep
    with torch.no_grad(), vtprune.disabled(model):
        pos = forward_positions(family, model, inputs)
        ref = model(**{**inputs, "attention_mask": mask, "position_ids": pos}).logits
        # DeepStack is not a no-op here: without it the reference differs
        drop = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "deepstack_visual_embeds": None}), with_kwargs=True)
        no_ds = model(**{**inputs, "attention_mask": mask, "position_ids": pos}).logits
        drop.remove()
    for h in handles:
        h.remove()
    assert rep.visual_after < rep.visual_before
    (p_vis, p_ds), (r_vis, r_ds) = seen["ds"][0], seen["ds"][1]
    assert len(p_ds) == len(r_ds) == len(model.config.vision_config.deepstack_visual_indexes) == 2
    p_slot, r_slot = _slots(p_vis), _slots(r_vis)
    for b in range(tm.shape[0]):
        rows = (tm[b] >= 0).nonzero().flatten()
        orig = tm[b, rows]
        torch.testing.assert_close(pruned[b, rows], ref[b, orig], rtol=0, atol=1e-5)
        assert (pruned[b, rows] - no_ds[b, orig]).abs().max() > 1e-3
        vis = p_vis[b, rows]
        assert torch.equal(vis, r_vis[b, orig])  # visual rows of the pruned sequence = kept image tokens
        for j in range(len(p_ds)):  # each kept token carries its own DeepStack features
            assert torch.equal(p_ds[j][p_slot[b, rows[vis]]], r_ds[j][r_slot[b, orig[vis]]])
        # the injection after layer 0 lands on the kept rows exactly as in the full sequence
        torch.testing.assert_close(seen["h1"][0][b, rows], seen["h1"][1][b, orig], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_stage_before_the_last_deepstack_layer_adds_the_kept_rows_features(family):
    """FastV at layer 1 compacts the sequence before the second DeepStack addition (after layer 1): vtprune adds it
    on the kept rows, each with its own features; at layer 2 the model's own code does all of them."""
    model, _ = model_and_processor(family, text_layers=4)
    inputs = batch(family, [0])
    lm = model.model.language_model
    with torch.no_grad():  # unpruned
        ref_ds = []
        h = lm.register_forward_pre_hook(lambda m, a, kw: ref_ds.append(kw), with_kwargs=True)
        model(**inputs)
        h.remove()
    r_vis, r_ds = ref_ds[0]["visual_pos_masks"], ref_ds[0]["deepstack_visual_embeds"]
    out1, in2 = [], []
    h_out = lm.layers[1].register_forward_hook(lambda m, a, o: out1.append(o.clone()))  # runs before vtprune's
    hooks = {k: len(getattr(lm.layers[1], k)) for k in ("_forward_hooks", "_forward_pre_hooks")}
    vtprune.prune(model, method="fastv", keep=3, layer=1)
    h_in = lm.layers[2].register_forward_pre_hook(lambda m, a: in2.append(a[0].clone()))
    with torch.no_grad():
        model(**inputs)
    tm = vtprune.last_report(model).token_map[0]
    assert tm.numel() < inputs["input_ids"].shape[1]
    vis = r_vis[0, tm]
    expect = out1[0].clone()
    expect[0, vis] += r_ds[1][_slots(r_vis)[0, tm[vis]]]
    torch.testing.assert_close(in2[0], expect, rtol=0, atol=1e-6)
    vtprune.unprune(model)
    h_in.remove()
    h_out.remove()
    assert {k: len(getattr(lm.layers[1], k)) for k in hooks} == {k: v - (k == "_forward_hooks")
                                                                 for k, v in hooks.items()}
    assert not lm._forward_pre_hooks and not lm._forward_hooks
    vtprune.prune(model, method="fastv", keep=3, layer=2)  # every addition before the stage: no DeepStack hooks
    assert not lm._forward_pre_hooks and not lm._forward_hooks


# 3-D positions of kept tokens (by hand and the model's own) and decoding after the unpruned maximum: the shared
# Qwen test, tests/test_qwen_internvl.py::test_qwen_3d_positions_of_kept_tokens_match_the_grid_by_hand[qwen3_vl*]


def test_received_attention_and_vflow_importance_equal_eager():
    """The substitute signals come from the last ViT block (all Qwen3-VL blocks attend fully), per image."""
    model, _ = model_and_processor("qwen3_vl")
    inputs = batch("qwen3_vl", [0, 2])
    ref = copy.deepcopy(model)
    attn = ref.model.visual.blocks[-1].attn
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    rec = []

    def fn(mod, q, k, v, attention_mask, *a, **kw):
        o, wts = eager(mod, q, k, v, attention_mask, *a, **kw)
        if mod is attn:
            rec.append(wts[0].float().mean(0))  # head mean: [L, L] per image
        return o, wts

    AttentionInterface.register("test_qwen3_eager_recorder", fn)
    ref.set_attn_implementation({"vision_config": "test_qwen3_eager_recorder"})
    with torch.no_grad():
        ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    received = torch.cat([a.mean(0) for a in rec]).view(-1, 4).sum(1)  # 2x2 merge window = 4 consecutive patches
    importance = []
    for a in rec:
        rho = a.mean(0)
        g = rho > 30.0 * rho.mean()
        g = g if g.any() else torch.ones_like(g)
        importance.append((a * g[:, None]).sum(0) / g.sum())
    importance = torch.cat(importance).view(-1, 4).sum(1)
    vtprune.prune(model, method="fastervlm", keep=5)
    with torch.no_grad():
        images = model._vtprune_state.adapter.encode(dict(inputs), {"cls_attention", "vflow_importance"})
    assert [im.features.shape[0] for im in images] == [12, 15]
    torch.testing.assert_close(torch.cat([im.signals["cls_attention"] for im in images]), received, rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(torch.cat([im.signals["vflow_importance"] for im in images]), importance, rtol=0,
                               atol=1e-6)
    assert "substitute" in images[0].signal_source
    assert images[0].extras["deepstack"].shape == (12, 2, model.config.text_config.hidden_size)


def test_vflowopt_summaries_carry_their_anchors_deepstack_features():
    """vflowopt recycles dropped tokens into summaries at anchor slots (features merged); DeepStack rows are the
    anchors' own, and the call stays batch-invariant."""
    model, _ = model_and_processor("qwen3_vl")
    vtprune.prune(model, method="vflowopt", keep=6)
    seen, handles = _record(model)
    with torch.no_grad():
        both = model(**batch("qwen3_vl", [0, 2])).logits
        rep = vtprune.last_report(model)
        one = model(**batch("qwen3_vl", [2])).logits
    for h in handles:
        h.remove()
    assert [i.n_after for i in rep.images] == [6, 6]
    torch.testing.assert_close(both[1, -one.shape[1]:], one[0], rtol=0, atol=1e-5)
    adapter = model._vtprune_state.adapter
    with torch.no_grad():
        images = adapter.encode(dict(batch("qwen3_vl", [0, 2])), {"vflow_importance", "grid"})
    vis, ds = seen["ds"][0]
    expect = torch.cat([im.extras["deepstack"][e.kept] for im, e in zip(images, rep.images)])
    assert torch.equal(torch.stack(ds, 1), expect) and int(vis.sum()) == 12


def test_errors_name_the_problem():
    model, _ = model_and_processor("qwen3_vl")
    inputs = dict(batch("qwen3_vl", [0]))
    with pytest.raises(ValueError, match="'globalcom2' needs the signal"):  # no crop layout in Qwen's inputs
        vtprune.prune(model, method="globalcom2", keep=4)
    # the errors Qwen3-VL shares with Qwen2-VL (grid, token types, video): tests/test_qwen_internvl.py::test_qwen_errors
    vtprune.prune(model, method="divprune", keep=4)
    with torch.no_grad():
        model(**inputs)
    assert vtprune.last_report(model).images[0].n_after == 4
