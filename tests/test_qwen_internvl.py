"""Qwen2-VL / Qwen2.5-VL positions and signals; InternVL [CLS] through pixel shuffle; family-specific errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface

import vtprune
from tests.families import (
    batch,
    eager_vision_copy,
    forward_positions,
    grid_positions_by_hand,
    model_and_processor,
    prompt,
)
from vtprune.testing import tiny_image


def _lm_positions(model):
    """Record the position_ids every language-model call receives."""
    seen = []

    def hook(mod, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_qwen_3d_positions_of_kept_tokens_match_the_grid_by_hand(family):
    model, proc = model_and_processor(family)
    inputs = batch(family, [0])  # one image -> grid_thw (1, 6, 8) -> 3 x 4 LLM tokens
    t, gh, gw = inputs["image_grid_thw"][0].tolist()
    h, w = gh // 2, gw // 2
    ids = inputs["input_ids"][0]
    expect, first, n_img = grid_positions_by_hand(ids, model.config.image_token_id, h, w)
    with torch.no_grad():
        assert torch.equal(forward_positions(family, model, inputs)[:, 0], expect)  # the model's own code agrees

    vtprune.prune(model, method="fastervlm", keep=5)
    seen, handle = _lm_positions(model)
    with torch.no_grad():
        model(**inputs)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                             suppress_tokens=[model.config.image_token_id])
    handle.remove()
    kept = vtprune.last_report(model).images[0].kept
    keep_cols = torch.cat([torch.arange(first), first + kept, torch.arange(first + n_img, ids.numel())])
    assert torch.equal(seen[0][:, 0], expect[:, keep_cols])  # forward: [3, B, L'] on the unpruned layout
    # positions reach the model explicitly, so vtprune never writes the model's cached rope_deltas: it holds what the
    # model's own code computed for the unpruned prompt (unprune leaves no pruned value behind)
    assert torch.equal(model.model.rope_deltas.flatten(), torch.tensor([int(expect.max()) + 1 - ids.numel()]))
    # generate: the 3 M-RoPE rows of the prefill are the same kept columns; decoding continues after the unpruned max
    assert torch.equal(seen[1][1:, 0], expect[:, keep_cols])
    nxt = int(expect.max()) + 1
    assert [int(p[1:, 0, -1].unique()) for p in seen[2:]] == [nxt, nxt + 1]
    assert out.shape[1] == ids.numel() + 3


def _eager_weights_recorder(model, module):
    """Register a test-side attention function that runs eager attention and records its probabilities."""
    import sys

    eager = sys.modules[type(module).__module__].eager_attention_forward
    rec = []

    def fn(mod, q, k, v, attention_mask, *a, **kw):
        o, wts = eager(mod, q, k, v, attention_mask, *a, **kw)
        if mod is module:
            rec.append(wts.float())
        return o, wts

    AttentionInterface.register("test_eager_recorder", fn)
    model.set_attn_implementation({"vision_config": "test_eager_recorder"})
    return rec


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_received_attention_equals_eager(family):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 2])
    ref_model = copy.deepcopy(model)
    vtprune.prune(model, method="fastervlm", keep=5)
    adapter = model._vtprune_state.adapter
    k = adapter._score_block()
    with torch.no_grad():
        images = adapter.encode(dict(inputs), {"cls_attention"})
        rec = _eager_weights_recorder(ref_model, ref_model.model.visual.blocks[k].attn)
        ref_model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    patch = torch.cat([wts[0].mean(0).mean(0) for wts in rec])  # per image: mean over queries, then heads
    unit = patch.view(-1, 4).sum(1)
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        vc = model.config.vision_config
        wi, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2, window_size=vc.window_size,
                                        patch_size=vc.patch_size)
        unit = unit[torch.argsort(wi)]
    got = torch.cat([im.signals["cls_attention"] for im in images])
    torch.testing.assert_close(got, unit, rtol=0, atol=1e-6)
    assert "substitute" in images[0].signal_source


def test_internvl_cls_probe_equals_eager_and_shuffle_groups():
    model, _ = model_and_processor("internvl")
    inputs = batch("internvl", [0, 1])
    eager = eager_vision_copy(model)
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
        cls = out.attentions[-1][:, :, 0, 1:].mean(1)  # [tiles, 16]
    vtprune.prune(model, method="fastervlm", keep=3)
    adapter = model._vtprune_state.adapter
    groups = adapter._shuffle_groups(16)  # [4 tokens, 4 source patches]
    # the grouping is what pixel_shuffle does to features: channel block c of token t comes from patch groups[t, c]
    feats = torch.randn(1, 4, 4, 8)
    shuffled = model.model.pixel_shuffle(feats, scale_factor=0.5).reshape(4, 4, 8)
    flat = feats.reshape(16, 8)
    for tok in range(4):
        for c in range(4):
            assert torch.equal(shuffled[tok, c], flat[groups[tok, c]])
    with torch.no_grad():
        images = adapter.encode(dict(inputs), {"cls_attention"})
    got = torch.cat([im.signals["cls_attention"] for im in images])
    torch.testing.assert_close(got, cls[:, groups].sum(-1).flatten(), rtol=0, atol=1e-6)
    # tiles per image come from the prompt: image 0 (120x60) has 3 tiles, image 1 (56x56) one
    assert [im.features.shape[0] for im in images] == [12, 4]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_errors(family):
    model, _ = model_and_processor(family)
    inputs = dict(batch(family, [0]))
    vc = model.config.vision_config
    vtprune.prune(model, method="divprune", keep=4)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    with pytest.raises(ValueError, match="video inputs.*not supported.*disabled"):
        model(**inputs, pixel_values_videos=torch.zeros(4, 3 * vc.temporal_patch_size * vc.patch_size ** 2),
              video_grid_thw=torch.tensor([[2, 2, 2]]))
    with torch.no_grad():
        model(**inputs)  # still works after the errors
    assert vtprune.last_report(model).images[0].n_after == 4


def test_internvl_image_count_mismatch():
    model, proc = model_and_processor("internvl")
    inputs = proc(images=[tiny_image(56, 56)], text=[prompt("internvl", "what?")], return_tensors="pt")
    vtprune.prune(model, method="divprune", keep=2)
    bad = dict(inputs)
    bad["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="2 tiles|placeholder"):
        model(**bad)


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_keep_larger_than_an_image_keeps_all_of_it(family):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    vtprune.prune(model, method="divprune", keep=8)
    with torch.no_grad():
        model(**inputs)
    for im in vtprune.last_report(model).images:
        assert im.n_after == min(8, im.n_before)
