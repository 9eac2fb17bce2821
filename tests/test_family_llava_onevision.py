"""LLaVA-OneVision specifics: bilinear down-sampling inside packing, the trailing newline of an uncropped image
(multi-image samples), and the received-attention substitute for the [CLS] signal SigLIP lacks."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.families import batch, eager_vision_copy, lm_call, model_and_processor, prompt
from tests.test_contract import _reference_logits
from vtprune.registry import get_adapter_class
from vtprune.testing import tiny_image

FAMILY = "llava_onevision"
SIDE = 4  # 56-px sub-images, 14-px patches
PER_SUB = SIDE * SIDE


def _lm_embeds(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, inputs_embeds the language model receives) of one forward."""
    seen, logits = lm_call(model, inputs)
    return logits, seen["inputs_embeds"]


def _newline_rows(model, embeds: torch.Tensor) -> torch.Tensor:
    return (embeds == model.model.image_newline.to(embeds)).all(-1)


def test_large_image_is_down_sampled_by_the_model():
    """The test image the matrix runs first really takes the bilinear branch (else the tests below prove little)."""
    model, _ = model_and_processor(FAMILY)
    inputs = batch(FAMILY, [0])
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        f = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True,
                                           batch_num_images=inputs["batch_num_images"]).pooler_output[0]
    nl = (f == model.model.image_newline).all(-1)
    rows, width = int(nl.sum()), (n - PER_SUB) // int(nl.sum()) - 1
    # 4×4 crops of 200×176 px unpad to 14×16 tokens; AnyRes-max-9 shrinks that to 11×12
    assert f.shape[0] == n == PER_SUB + rows * (width + 1) and (rows, width) == (11, 12)


@pytest.mark.parametrize("method", ["fastervlm", "uniform", "holov", "random", "divprune"])
def test_kept_tokens_are_the_models_own_packed_tokens(method):
    """Down-sampled image in a padded batch: every embedding the LLM receives is the unpruned call's embedding at
    the position the token map names (image tokens included: the model's bilinear features, never re-derived);
    newline tokens are kept and uncounted for methods that keep them, counted in divprune's pool."""
    model, _ = model_and_processor(FAMILY)
    inputs = batch(FAMILY, [0, 2])
    _, full = _lm_embeds(model, inputs)
    keep = 20
    vtprune.prune(model, method=method, keep=keep)
    _, pruned = _lm_embeds(model, inputs)
    rep = vtprune.last_report(model)
    tm = rep.token_map
    real = tm >= 0
    gathered = full.gather(1, tm.clamp(min=0)[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.equal(pruned[real], gathered[real])
    is_img = inputs["input_ids"] == model.config.image_token_id
    for b, im in enumerate(rep.images):
        pos = is_img[b].nonzero().flatten()
        model_nl = _newline_rows(model, full[b, pos])
        assert torch.equal(im.newline, model_nl)  # the adapter's layout is the model's packing
        rows = tm[b][real[b]]
        assert torch.equal(pos[im.kept], rows[is_img[b, rows]])  # the report's kept tokens are the ones sent
        if method == "divprune":
            assert im.n_after == keep
        else:
            assert model_nl[im.kept].sum() == model_nl.sum()  # every newline kept
            assert im.n_after - im.n_newline == keep


@pytest.mark.parametrize("method", ["fastervlm", "holov", "uniform"])
def test_down_sampled_image_matches_masked_reference(method):
    model, _ = model_and_processor(FAMILY)
    inputs = batch(FAMILY, [0])
    vtprune.prune(model, method=method, keep=9)
    with torch.no_grad():
        pruned = model(**inputs).logits
    rep = vtprune.last_report(model)
    ref, keep = _reference_logits(FAMILY, model, inputs, rep, "preserve")
    torch.testing.assert_close(pruned[0], ref[0][keep[0]], rtol=0, atol=1e-5)


def test_down_sampled_tokens_take_their_dominant_source():
    """The layout names, for each down-sampled token, a source patch of largest bilinear weight: checked against
    the model's own packing run on one-hot maps (each packed token comes out as its bilinear weights)."""
    model, _ = model_and_processor(FAMILY)
    inputs = batch(FAMILY, [0, 1, 2])
    adapter = get_adapter_class(FAMILY)(model)
    n_sub, layout = adapter._pack_layout(dict(inputs), PER_SUB, "full", torch.device("cpu"))
    hots = [torch.eye(k * PER_SUB).view(k, PER_SUB, k * PER_SUB) for k in n_sub]
    with torch.no_grad():
        weights, _ = model.model.pack_image_features(hots, inputs["image_sizes"], image_newline=torch.zeros(1),
                                                     vision_aspect_ratio=model.config.vision_aspect_ratio)
    down = 0
    for src, (k, w) in zip(layout, zip(n_sub, weights)):
        assert src.shape[0] == w.shape[0]
        w = w[:, : k * PER_SUB]
        nl = src < 0
        assert (w[nl] == 0).all()
        rows = torch.arange(src.shape[0])[~nl]
        best = w[rows].max(1).values
        assert torch.equal(w[rows, src[~nl]], best)  # the named source has the largest weight
        mixed = (w[rows] > 0).sum(1) > 1  # tokens the model mixes from several patches
        down += int(mixed.sum())
        assert torch.equal(src[:PER_SUB], torch.arange(PER_SUB))  # the base image is never resampled
    assert down > 0  # the large image was down-sampled


def test_received_attention_substitute_equals_eager_attention():
    model, _ = model_and_processor(FAMILY)
    inputs = batch(FAMILY, [0, 1])
    eager = eager_vision_copy(model)
    with torch.no_grad():
        out = eager.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], output_attentions=True,
                                             batch_num_images=inputs["batch_num_images"], return_dict=True)
    received = out.attentions[-1].mean(1).mean(1)  # [sub-images, patches]: head mean, mean over queries
    vtprune.prune(model, method="fastervlm", keep=8)
    with torch.no_grad():
        model(**inputs)
        images = model._vtprune_state.adapter.encode(dict(inputs), {"cls_attention", "crop_ids"})
    assert "substitute" in vtprune.last_report(model).images[0].signal
    n_sub, layout = model._vtprune_state.adapter._pack_layout(dict(inputs), PER_SUB, "full", torch.device("cpu"))
    start = 0
    for im, k, src in zip(images, n_sub, layout):
        sig, nl = im.signals["cls_attention"], src < 0
        torch.testing.assert_close(sig[~nl], received[start:start + k].flatten()[src[~nl]], rtol=0, atol=1e-6)
        assert (sig[nl] == 0).all()
        assert torch.equal(im.signals["crop_ids"][~nl], src[~nl] // PER_SUB)
        start += k


def test_globalcom2_is_refused_clearly():
    model, _ = model_and_processor(FAMILY)
    with pytest.raises(ValueError, match="globalcom2.*cls_logits.*methods this family can run"):
        vtprune.prune(model, method="globalcom2", keep=8)
    assert not vtprune.is_pruned(model)


def test_multi_image_sample_runs_base_images_with_trailing_newline():
    """A sample with several images (nested list): the processor and the model use each image's base view only,
    16 tokens then one newline; pruning follows that layout and matches the masked reference."""
    model, proc = model_and_processor(FAMILY)
    imgs = [tiny_image(200, 176, seed=1), tiny_image(60, 60, seed=2)]
    inputs = proc(images=[imgs], text=[prompt(FAMILY, "compare them", 2)], return_tensors="pt")
    assert inputs["batch_num_images"].tolist() == [2]
    _, full = _lm_embeds(model, inputs)
    vtprune.prune(model, method="fastervlm", keep=5)
    with torch.no_grad():
        pruned = model(**inputs).logits
    rep = vtprune.last_report(model)
    assert [(i.n_before, i.n_after, i.n_newline) for i in rep.images] == [(PER_SUB + 1, 6, 1)] * 2
    runs = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten().view(2, -1)
    for im, pos in zip(rep.images, runs):
        assert torch.equal(im.newline, _newline_rows(model, full[0, pos]))
        assert im.newline.nonzero().flatten().tolist() == [PER_SUB]
    ref, keep = _reference_logits(FAMILY, model, inputs, rep, "preserve")
    torch.testing.assert_close(pruned[0], ref[0][keep[0]], rtol=0, atol=1e-5)


def test_flowcut_runs_its_llm_stage_variant():
    """No in-tower FlowCut through AnyRes packing (vision_stage False): flowcut runs in the LLM at its default layer,
    exactly ``keep`` per image, newline tokens in the pool."""
    model, _ = model_and_processor(FAMILY, text_layers=4)
    inputs = batch(FAMILY, [0, 1])
    vtprune.prune(model, method="flowcut", keep=5)
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    assert {e.stage for e in rep.images} == {"llm:2"} and [e.n_after for e in rep.images] == [5, 5]
