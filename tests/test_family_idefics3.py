"""Idefics3 / SmolVLM specifics: an image is several placeholder runs (tiles + global image) between text markers.

Markers are text: never pruned, never moved; an image's budget covers all its tiles, before the LLM and inside it;
the substitute signal (received attention summed over each pixel-shuffle block) equals a test-side eager re-derivation.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.families import batch, eager_vision_copy, forward_positions, model_and_processor, two_images
from vtprune.registry import get_adapter_class

FAMILIES = ["idefics3", "smolvlm"]
PER_TILE = 4  # 16 patches per 64-px tile, folded 2 x 2 by the pixel shuffle


def _lm_input_ids(model, inputs) -> torch.Tensor:
    """The input_ids the pruned model's inner model (vision merge + language model) receives."""
    seen = {}
    h = model.model.register_forward_pre_hook(lambda m, a, k: seen.update(ids=k["input_ids"]),
                                              with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return seen["ids"]


def _runs(row: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of every run of image tokens in a row."""
    pos = (row == image_token_id).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for p in pos:
        if runs and p == runs[-1][1]:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [(a, b) for a, b in runs]


@pytest.mark.parametrize("family", FAMILIES)
def test_image_index_groups_an_images_tile_runs(family):
    """Two images (2 x 1 tiles + global, then 2 x 2 + global): runs 0-2 are image 0, runs 3-7 image 1, text -1."""
    model, _ = model_and_processor(family)
    inputs = two_images(family)
    ids = inputs["input_ids"]
    runs = _runs(ids[0], model.config.image_token_id)
    assert [b - a for a, b in runs] == [PER_TILE] * 8
    expect = torch.full_like(ids, -1)
    for r, (a, b) in enumerate(runs):
        expect[0, a:b] = 0 if r < 3 else 1
    assert torch.equal(get_adapter_class(family)(model).image_index(ids), expect)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["divprune", "fastervlm", "holov", "uniform"])
def test_markers_stay_and_the_budget_covers_every_tile(family, method):
    """pre_llm: the language model gets the caller's prompt minus dropped image tokens only (every marker, newline
    and text token kept, in order); each image keeps exactly ``keep`` over all its tiles, some runs emptied."""
    model, _ = model_and_processor(family)
    inputs = two_images(family)
    ids = inputs["input_ids"]
    vtprune.prune(model, method=method, keep=3)
    got = _lm_input_ids(model, inputs)
    rep = vtprune.last_report(model)
    assert [(e.sample, e.image, e.n_before, e.n_after) for e in rep.images] == [(0, 0, 12, 3), (0, 1, 20, 3)]
    is_img = ids[0] == model.config.image_token_id
    kept = rep.token_map[0]
    assert torch.equal(got[0], ids[0, kept])
    assert torch.equal(ids[0, kept][ids[0, kept] != model.config.image_token_id], ids[0, ~is_img])  # all text, in order
    assert int((got[0] == model.config.image_token_id).sum()) == 6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["preserve", "compact"])
def test_pruned_equals_masked_reference_with_markers(family, positions):
    """Two multi-tile images in one prompt: the pruned forward equals the unpruned model on the full sequence (markers
    included) with the dropped image tokens masked, at the positions the unpruned prompt (or the compacted one) has."""
    model, _ = model_and_processor(family)
    inputs = two_images(family)
    vtprune.prune(model, method="divprune", keep=5, positions=positions)
    with torch.no_grad():
        pruned = model(**inputs).logits
    rep = vtprune.last_report(model)
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    keep[0, rep.token_map[0]] = True
    mask = inputs["attention_mask"] * keep
    pos = forward_positions(family, model, inputs) if positions == "preserve" else (mask.cumsum(1) - 1).clamp(min=0)
    with vtprune.disabled(model), torch.no_grad():
        ref = model(**{**inputs, "attention_mask": mask, "position_ids": pos}).logits
    torch.testing.assert_close(pruned[0], ref[0][keep[0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_stage_budget_covers_every_tile(family):
    """llm:2 (FastV): one budget per image over all its tile runs (not per run), two images in one prompt."""
    model, _ = model_and_processor(family, text_layers=4)
    inputs = two_images(family)
    vtprune.prune(model, method="fastv", keep=3, layer=2)
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    assert [(e.stage, e.image, e.n_before, e.n_after) for e in rep.images] == [("llm:2", 0, 12, 3),
                                                                               ("llm:2", 1, 20, 3)]
    assert rep.layer_visual_tokens[0].tolist() == [32, 32, 6, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_stage_after_pre_llm_finds_images_whose_runs_were_emptied(family):
    """pre_llm keeps 2 of an image's 3 or 5 runs' tokens, so whole runs (global ones too) disappear; the llm:2 stage
    after it still sees two images, each with its own budget."""
    model, _ = model_and_processor(family, text_layers=4)
    inputs = two_images(family)
    ids = inputs["input_ids"][0]
    global_runs = [_runs(ids, model.config.image_token_id)[r] for r in (2, 7)]  # each image's last run
    emptied = 0
    for seed in range(6):  # several random choices, so some leave an image without its global run
        vtprune.prune(model, stages=[{"method": "random", "keep": 2}, {"method": "fastv", "keep": 1, "layer": 2}],
                      seed=seed)
        with torch.no_grad():
            model(**inputs)
        rep = vtprune.last_report(model)
        assert [(e.stage, e.image, e.n_before, e.n_after) for e in rep.images] == [
            ("pre_llm", 0, 12, 2), ("pre_llm", 1, 20, 2), ("llm:2", 0, 2, 1), ("llm:2", 1, 2, 1)], seed
        pre = [e.kept + (0 if e.image == 0 else 12) for e in rep.images[:2]]  # kept among the prompt's image tokens
        img_pos = (ids == model.config.image_token_id).nonzero().flatten()
        kept_pos = img_pos[torch.cat(pre)]
        emptied += sum(not bool(((kept_pos >= a) & (kept_pos < b)).any()) for a, b in global_runs)
        vtprune.unprune(model)
    assert emptied > 0  # the case this test is about did occur


def _blocks(side: int) -> torch.Tensor:
    """[tokens, 4]: the patches of each 2 x 2 block, in the raster order of the shuffled tokens (worked out by hand)."""
    return torch.tensor([[(2 * i + a) * side + 2 * j + b for a in (0, 1) for b in (0, 1)]
                         for i in range(side // 2) for j in range(side // 2)])


@pytest.mark.parametrize("family", FAMILIES)
def test_substitute_signal_is_received_attention_summed_over_blocks(family):
    """fastervlm keeps the top tokens by the attention their four patches receive (mean over the tile's queries, head
    mean) in the last ViT layer, from an eager tower run; the report names the substitute."""
    model, _ = model_and_processor(family)
    inputs = batch(family, [1])  # one image: 2 x 2 tiles + global
    eager = eager_vision_copy(model)
    pv = inputs["pixel_values"][0]
    with torch.no_grad():
        out = eager.model.vision_model(pixel_values=pv, output_attentions=True)
    att = out.attentions[-1].float().mean(1).mean(1)  # [tiles, patches]: head mean, mean over queries
    score = att[:, _blocks(4)].sum(-1).flatten()  # [tiles * 4]
    vtprune.prune(model, method="fastervlm", keep=7)
    with torch.no_grad():
        model(**inputs)
    (entry,) = vtprune.last_report(model).images
    assert "received attention" in entry.signal and "substitute" in entry.signal
    assert torch.equal(entry.kept, score.topk(7).indices.sort().values)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiles_are_crops_and_flowcut_runs_in_the_llm(family):
    """holov gets one crop per tile (global image included); globalcom2 is refused (no thumbnail logits / coords);
    flowcut runs its LLM-stage variant (no in-tower FlowCut for this tower)."""
    model, _ = model_and_processor(family, text_layers=4)
    adapter = get_adapter_class(family)(model)
    adapter.attach({"cls_attention"})
    try:
        (im,) = adapter.encode(dict(batch(family, [1])), {"cls_attention"})
    finally:
        adapter.detach()
    assert torch.equal(im.signals["crop_ids"], torch.arange(5).repeat_interleave(PER_TILE))
    assert im.grid == [(2, 2)] * 5 and im.features.shape[0] == 20
    with pytest.raises(ValueError, match="'globalcom2' needs the signal"):
        vtprune.prune(model, method="globalcom2", keep=4)
    vtprune.prune(model, method="flowcut", keep=5)
    with torch.no_grad():
        model(**batch(family, [0, 1]))
    rep = vtprune.last_report(model)
    assert [(e.stage, e.n_before, e.n_after) for e in rep.images] == [("llm:2", 12, 5), ("llm:2", 20, 5)]
