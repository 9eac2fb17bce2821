"""VFlowOpt-style selector: importance from global-token attention, recycling into group summaries."""

from __future__ import annotations

import pytest
import torch

import vtprune
from tests.families import FAMILIES, batch, eager_vision_copy, model_and_processor
from vtprune.selectors.vflowopt import _cells, vflowopt_select


def test_recycled_tokens_are_importance_weighted_group_means_at_the_argmax_slot():
    torch.manual_seed(0)
    feats = torch.randn(2, 64, 8)
    imp = torch.rand(2, 64)
    idx, toks = vflowopt_select(feats, 10, vflow_importance=imp, grid=(8, 8), cells=2)
    cell = _cells((8, 8), 64, 2, feats.device)
    for r in range(2):
        valid = idx[r] >= 0
        slots, t = idx[r][valid], toks[r][valid]
        assert torch.equal(slots, slots.sort().values) and slots.unique().numel() == slots.numel()
        direct = imp[r].topk(10 - 4).indices
        dropped = torch.ones(64, dtype=torch.bool)
        dropped[direct] = False
        n_groups = cell[dropped].unique().numel()
        assert slots.numel() == 6 + n_groups <= 10
        for s, tok in zip(slots.tolist(), t):
            if s in direct.tolist():
                assert torch.equal(tok, feats[r, s])  # kept as it is
            else:
                members = (dropped & (cell == cell[s])).nonzero().flatten()
                assert s == members[imp[r, members].argmax()]
                w = imp[r, members] / imp[r, members].sum()
                torch.testing.assert_close(tok, (w[:, None] * feats[r, members]).sum(0))


def test_small_budget_falls_back_to_top_k_and_keep_all_is_identity():
    feats, imp = torch.randn(1, 16, 4), torch.rand(1, 16)
    idx, toks = vflowopt_select(feats, 1, vflow_importance=imp, grid=(4, 4), cells=2)  # no room for a summary
    assert torch.equal(idx[0], imp[0].topk(1).indices.sort().values)
    assert torch.equal(toks[0], feats[0, idx[0]])
    idx, toks = vflowopt_select(feats, 16, vflow_importance=imp, grid=(4, 4))
    assert torch.equal(idx[0], torch.arange(16)) and torch.equal(toks, feats)
    with pytest.raises(ValueError, match="vflow_importance"):
        vflowopt_select(feats, 3)


def test_importance_probe_equals_eager_attention():
    model, _ = model_and_processor("llava")
    inputs = batch("llava", [0, 1])
    eager = eager_vision_copy(model)
    with torch.no_grad():
        att = eager.model.get_image_features(pixel_values=inputs["pixel_values"], output_attentions=True,
                                             return_dict=True, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").attentions[-2]
    a = att.mean(1)  # [images, 17, 17] head mean, [CLS] included as in the layer
    rho = a.mean(1)
    g = rho > 30.0 * rho.mean(-1, keepdim=True)
    g = torch.where(g.any(-1, keepdim=True), g, torch.ones_like(g))
    expect = ((a * g[:, :, None]).sum(1) / g.sum(-1, keepdim=True))[:, 1:]
    vtprune.prune(model, method="vflowopt", keep=6)
    with torch.no_grad():
        images = model._vtprune_state.adapter.encode(dict(inputs), {"vflow_importance", "grid"})
    got = torch.stack([im.signals["vflow_importance"] for im in images])
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_batch_equals_single_and_cache_parity(family):
    model, _ = model_and_processor(family)
    vtprune.prune(model, method="vflowopt", keep=6)
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
              suppress_tokens=[model.config.image_token_id, 2])
    full = batch(family, [0, 1, 2])
    with torch.no_grad():
        a = model.generate(**full, **kw)
        b = model.generate(**full, use_cache=False, **kw)
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0, atol=1e-5)
        rep = vtprune.last_report(model)
        assert all(i.n_after - i.n_newline <= 6 for i in rep.images)
        for s in range(3):
            one = model.generate(**batch(family, [s]), **kw)
            torch.testing.assert_close(torch.stack(a.logits)[:, s], torch.stack(one.logits)[:, 0], rtol=0,
                                       atol=1e-5)


def test_two_signals_read_from_one_vit_layer_in_one_pass():
    model, _ = model_and_processor("qwen2_5_vl")
    inputs = batch("qwen2_5_vl", [0])
    vtprune.prune(model, method="vflowopt", keep=6)
    adapter = model._vtprune_state.adapter
    with torch.no_grad():
        both = adapter.encode(dict(inputs), {"vflow_importance"})
    vtprune.unprune(model)
    vtprune.prune(model, method="fastervlm", keep=6)  # the same block, the other reducer, armed together below
    adapter = model._vtprune_state.adapter
    with torch.no_grad():
        two = adapter.encode(dict(inputs), {"vflow_importance", "cls_attention"})
    torch.testing.assert_close(two[0].signals["vflow_importance"], both[0].signals["vflow_importance"], rtol=0,
                               atol=0)
    assert two[0].signals["cls_attention"].shape == both[0].signals["vflow_importance"].shape
