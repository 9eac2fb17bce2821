"""Signals and layout of the LLaVA family: the [CLS] probe equals eager attention; NeXT layout matches the model."""

from __future__ import annotations

import torch

import vtprune
from tests.families import batch, eager_vision_copy, model_and_processor
from vtprune.adapters.llava import LlavaNextAdapter


def _eager_cls(model, inputs, **extra):
    eager = eager_vision_copy(model)
    with torch.no_grad():
        out = eager.model.get_image_features(pixel_values=inputs["pixel_values"], output_attentions=True,
                                             return_dict=True, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default", **extra)
    return out.attentions[-2][:, :, 0, 1:].mean(1)  # [sub-images, patches]


def test_cls_probe_equals_eager_and_keeps_sdpa():
    model, _ = model_and_processor("llava")
    inputs = batch("llava", [0, 1, 2])
    ref = _eager_cls(model, inputs)
    vtprune.prune(model, method="fastervlm", keep=5)
    assert model.config.text_config._attn_implementation == "sdpa"  # the language model is never made eager
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    for b, im in enumerate(rep.images):
        assert torch.equal(im.kept, ref[b].topk(5).indices.sort().values)
    with torch.no_grad():
        imgs = model._vtprune_state.adapter.encode(dict(inputs), {"cls_attention"})
    for b, im in enumerate(imgs):
        torch.testing.assert_close(im.signals["cls_attention"], ref[b], rtol=0, atol=1e-6)


def test_llava_next_layout_matches_packed_features():
    model, _ = model_and_processor("llava_next")
    inputs = batch("llava_next", [0, 1, 2])
    adapter = LlavaNextAdapter(model)
    adapter.attach({"cls_attention"})
    try:
        with torch.no_grad():
            images = adapter.encode(dict(inputs), {"cls_attention"})
    finally:
        adapter.detach()
    newline_vec = model.model.image_newline
    ref = _eager_cls(model, inputs, image_sizes=inputs["image_sizes"])
    start = 0
    for im, size in zip(images, inputs["image_sizes"]):
        f, nl = im.features, im.newline
        assert nl.any()
        assert torch.allclose(f[nl], newline_vec.expand(int(nl.sum()), -1))
        assert not any(torch.allclose(row, newline_vec) for row in f[~nl])
        grid = im.grid if isinstance(im.grid, list) else [im.grid]
        assert sum(h * w for h, w in grid) == int((~nl).sum())
        # base image first: its 16 tokens carry sub-image 0's [CLS] row unchanged
        torch.testing.assert_close(im.signals["cls_attention"][:16], ref[start], rtol=0, atol=1e-6)
        assert (im.signals["cls_attention"][nl] == 0).all()
        # every crop row of the unpadded map ends with a newline
        if len(grid) == 2:
            rows, width = grid[1]
            crop_nl = nl[16:].view(rows, width + 1)
            assert crop_nl[:, -1].all() and not crop_nl[:, :-1].any()
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        start += image_size_to_num_patches(image_size=size, grid_pinpoints=model.config.image_grid_pinpoints,
                                           patch_size=model.config.vision_config.image_size)


def test_keep_ratio_applies_per_image():
    model, _ = model_and_processor("llava_next")
    inputs = batch("llava_next", [0, 1])
    vtprune.prune(model, method="divprune", keep_ratio=0.25)
    with torch.no_grad():
        model(**inputs)
    for im in vtprune.last_report(model).images:
        assert im.n_after == max(1, round(0.25 * im.n_before))
