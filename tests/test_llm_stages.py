"""In-LLM stages (llm:K): FastV, PyramidDrop-style schedules, adaptive counts and composition with pre_llm, on every
family, against a test-side layer loop; plus cache parity, batches, reversibility and the attention probe."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import vtprune
from tests.families import FAMILIES, batch, mixes_attention_types, model_and_processor
from vtprune.registry import get_adapter_class

LAYERS = 4  # tiny language models deep enough for stages at layers 1..3
CONFIGS = {
    "fastv": dict(method="fastv", keep=3, layer=2),
    "pdrop": dict(method="pdrop"),  # default schedule: layers 1, 2, 3 with ratios 0.5, 0.25, 0.125
    "atp": dict(method="atp", mass=0.5),
    "flowcut": dict(method="flowcut", keep=3, layer=2),
    "compose": dict(stages=[{"method": "divprune", "keep": 6}, {"method": "fastv", "keep": 3, "layer": 2}]),
}
IDENTITY = {
    "fastv": dict(method="fastv", keep=100_000, layer=2),
    "pdrop": dict(method="pdrop", schedule=[(1, 1.0), (3, 1.0)]),
    "atp": dict(method="atp", min_keep=100_000, schedule=[(1, 1.0), (2, 1.0)]),
    "flowcut": dict(method="flowcut", keep=100_000, layer=2),
    "compose": dict(stages=[{"method": "divprune", "keep": 100_000}, {"method": "fastv", "keep": 100_000,
                                                                        "layer": 2}]),
}
# in-LLM stages refuse language models that mix attention types (test_mixed_attention_types_are_refused)
LLM_FAMILIES = [f for f in FAMILIES if not mixes_attention_types(f)]
CASES = [(f, c) for f in LLM_FAMILIES for c in CONFIGS]


def _model(family):
    return model_and_processor(family, LAYERS)[0]


def _gen(model, inputs, **kw):
    eos = model.generation_config.eos_token_id
    bad = [model.config.image_token_id, *(eos if isinstance(eos, list) else [2 if eos is None else eos])]
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=bad,
                          output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("family,name", CASES)
def test_identity_when_every_stage_keeps_all(family, name):
    model = _model(family)
    inputs = batch(family, [0, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = _gen(model, inputs).sequences
        vtprune.prune(model, **IDENTITY[name])
        out = model(**inputs).logits
        ids = _gen(model, inputs).sequences
    assert torch.equal(out, ref)
    assert torch.equal(ids, ref_ids)


def _stage_kept(model, inputs, report):
    """LM-input positions kept after each llm stage, from the report's per-image kept indices."""
    ids = inputs["input_ids"][0]
    # the family's own rule for the image of every position (an Idefics3 image spans several placeholder runs)
    img = get_adapter_class(model.config.model_type)(model).image_index(ids[None])[0]
    text = (img < 0).nonzero().flatten()
    kept: dict[int, torch.Tensor] = {}
    for e in report.images:
        if not e.stage.startswith("llm:"):
            continue
        layer = int(e.stage.split(":")[1])
        pos = (img == e.image).nonzero().flatten()[e.kept]
        kept[layer] = torch.cat([kept.get(layer, text), pos]).sort().values
    return kept


def _reference(model, inputs, kept):
    """Test-side layer loop: full sequence through layers < K, kept rows (hidden, cos/sin, positions) after; DeepStack
    features (Qwen3-VL) added after their layers at the visual rows still present."""
    lm = model.get_decoder()
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("x", (args[0], dict(kwargs)))

    def grab_lm(mod, args, kwargs):
        seen["ds"] = (kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds") or [])

    h = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    h_lm = lm.register_forward_pre_hook(grab_lm, with_kwargs=True)
    with vtprune.disabled(model), torch.no_grad():
        model(**inputs)
    h.remove()
    h_lm.remove()
    vis, deepstack = seen["ds"]
    hidden, kw = seen["x"]
    mask = kw["attention_mask"]  # one sample, no padding: None (causal), or the model's own prefix-LM mask
    cos, sin = kw["position_embeddings"]
    pos = kw.get("position_ids")
    current = torch.arange(hidden.shape[1])
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in kept:
                idx = torch.searchsorted(current, kept[i])
                assert torch.equal(current[idx], kept[i])
                hidden, cos, sin, current = hidden[:, idx], cos[:, idx], sin[:, idx], current[idx]
                pos = pos[..., idx] if pos is not None else None
                mask = mask[:, :, idx][..., idx] if mask is not None else None  # kept rows and columns
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos,
                           use_cache=False)
            if i < len(deepstack):
                rows = vis[0, current]
                hidden[0, rows] += deepstack[i][vis[0].cumsum(0)[current][rows] - 1]
        return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("family,name", [c for c in CASES if c[1] != "compose"])
def test_matches_test_side_layer_loop(family, name):
    model = _model(family)
    inputs = batch(family, [0])
    vtprune.prune(model, **CONFIGS[name])
    with torch.no_grad():
        out = model(**inputs).logits
    rep = vtprune.last_report(model)
    kept = _stage_kept(model, inputs, rep)
    assert kept and rep.visual_after < rep.visual_before
    ref = _reference(model, inputs, kept)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # positions are the kept tokens' own: the final token map points at the unpruned prompt's positions
    last = max(kept)
    assert torch.equal(rep.token_map[0], kept[last])


@pytest.mark.parametrize("family,name", CASES)
def test_generate_with_cache_equals_without(family, name):
    model = _model(family)
    inputs = batch(family, [0, 1, 2])
    vtprune.prune(model, **CONFIGS[name])
    with torch.no_grad():
        a = _gen(model, inputs)
        b = _gen(model, inputs, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0, atol=1e-5)
    n_in = inputs["input_ids"].shape[1]
    assert torch.equal(a.sequences[:, :n_in], inputs["input_ids"])


@pytest.mark.parametrize("family,name", CASES)
def test_padded_batch_equals_one_at_a_time(family, name):
    model = _model(family)
    vtprune.prune(model, **CONFIGS[name])
    full = batch(family, [0, 1, 2])
    with torch.no_grad():
        res = _gen(model, full)
        rep = vtprune.last_report(model)
        for b in range(3):
            one = _gen(model, batch(family, [b]))
            torch.testing.assert_close(torch.stack(res.logits)[:, b], torch.stack(one.logits)[:, 0], rtol=0,
                                       atol=1e-5)
            rep1 = vtprune.last_report(model)
            mine = [e for e in rep.images if e.sample == b]
            assert [(e.stage, e.kept.tolist()) for e in mine] == [(e.stage, e.kept.tolist()) for e in rep1.images]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in LLM_FAMILIES])
def test_mixed_attention_types_are_refused(family):
    """Gemma 3 mixes sliding-window and full layers: every in-LLM configuration raises a clear error at prune() and
    leaves the model as it was (the family's pre_llm methods run: tests/test_contract.py)."""
    model = _model(family)
    inputs = batch(family, [0])
    with torch.no_grad():
        ref = model(**inputs).logits
    for cfg in CONFIGS.values():
        with pytest.raises(ValueError, match=r"one attention type in every decoder layer; this model mixes \["):
            vtprune.prune(model, **cfg)
        assert not vtprune.is_pruned(model) and "generate" not in model.__dict__
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("family,name", CASES)
def test_reversible(family, name):
    model = _model(family)
    inputs = batch(family, [0, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
    impls = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    layer_hooks = [dict(layer._forward_pre_hooks) for layer in model.get_decoder().layers]
    vtprune.prune(model, **CONFIGS[name])
    with torch.no_grad():
        model(**inputs)
        with vtprune.disabled(model):
            assert torch.equal(model(**inputs).logits, ref)
    vtprune.unprune(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation) == impls
    assert [dict(layer._forward_pre_hooks) for layer in model.get_decoder().layers] == layer_hooks


def test_report_per_layer_counts_and_adaptive_counts():
    model = _model("llava")
    inputs = batch("llava", [0, 1, 2])
    vtprune.prune(model, method="pdrop")
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    # 16 visual tokens per image: layer 0 sees 16, then 8 / 4 / 2 (ratios of the original count)
    assert rep.layer_visual_tokens.tolist() == [[16, 8, 4, 2]] * 3
    assert rep.avg_visual_per_layer == [7.5] * 3
    assert "per LLM layer" in str(rep)
    assert rep.flops_after < rep.flops_before

    vtprune.unprune(model)
    vtprune.prune(model, method="atp", mass=0.5, schedule=[(1, 1.0), (2, 0.5), (3, 0.25)])
    with torch.no_grad():
        model(**inputs)
    counts = vtprune.last_report(model).layer_visual_tokens
    assert (counts[:, 1:] <= counts[:, :-1]).all()  # never increases across stages
    assert (counts[:, 2] <= 8).all() and (counts[:, 3] <= 4).all()  # caps
    assert (counts[:, 1] < 16).all()  # adaptive below its cap (ratio 1.0): half the attention mass


def test_atp_counts_follow_the_attention_distribution():
    feats = torch.randn(3, 20, 8)
    flat = torch.ones(3, 20)
    peaked = torch.full((3, 20), 0.01)
    peaked[:, 5] = 10.0
    mixed = torch.stack([flat[0], peaked[0], torch.exp(-torch.arange(20.0) / 3)])
    idx = vtprune.select_tokens("atp", feats, keep=12, text_attention=mixed, mass=0.9)
    counts = (idx >= 0).sum(1).tolist()
    assert counts[0] == 12  # flat: 90 % of the mass needs 18 tokens, capped at 12
    assert counts[1] == 1 and idx[1, 0] == 5  # one token holds > 90 %
    assert 1 < counts[2] < 12


def test_fastv_scores_equal_eager_attention():
    model = _model("llava")
    inputs = batch("llava", [0])
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1
    row = att[0, :, -1].mean(0)  # last prompt token, head mean
    img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    expect = row[img].topk(3).indices.sort().values
    vtprune.prune(model, method="fastv", keep=3, layer=2)
    assert model.config.text_config._attn_implementation.startswith("vtprune_probe+sdpa")
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(vtprune.last_report(model).images[0].kept, expect)


def test_composition_reports_both_stages():
    model = _model("qwen2_vl")
    inputs = batch("qwen2_vl", [0])
    vtprune.prune(model, **CONFIGS["compose"])
    with torch.no_grad():
        out = _gen(model, inputs)
    rep = vtprune.last_report(model)
    assert [e.stage for e in rep.images] == ["pre_llm", "llm:2"]
    assert [e.n_after for e in rep.images] == [6, 3]
    assert rep.layer_visual_tokens[0].tolist() == [6, 6, 3, 3]
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 6


def _layer_qkv(model, inputs, layer: int):
    """Query, key and value (after rotary) of decoder layer ``layer``'s attention call, captured test-side from an
    eager run: [B, H, L, d] each (key / value with the KV heads)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager"})
    mod = sys.modules[type(eager.get_decoder().layers[layer].self_attn).__module__]
    got = {}
    real = mod.eager_attention_forward

    def spy(module, query, key, value, *args, **kwargs):
        if module is eager.get_decoder().layers[layer].self_attn:
            got.update(q=query, k=key, v=value, scaling=kwargs.get("scaling"))
        return real(module, query, key, value, *args, **kwargs)

    mod.eager_attention_forward = spy
    try:
        with torch.no_grad():
            eager(**inputs)
    finally:
        mod.eager_attention_forward = real
    return got


def _first_entry(model, inputs, **prune_kwargs):
    """The report entry of the first image after one forward of a pruned copy of ``model``."""
    pruned = vtprune.prune(copy.deepcopy(model), **prune_kwargs)
    with torch.no_grad():
        pruned(**inputs)
    return vtprune.last_report(pruned).images[0]


def _flowcut_reference(q, k, v, scale, img, keep, per_head: bool = True):
    """FlowCut's LLM stage re-derived from SELECTORS.md §6.5 / the reference (``modeling_llama_flowcut.py``): for the
    last prompt token, per head, softmax(q·Kᵀ·scale) and softmax(v·Vᵀ·scale) over the *visual* keys only, then the
    head mean; score (a/Σa + s/Σs)·‖mean_h v‖₁; top-keep, ascending. ``per_head=False`` is vtprune's former math
    (softmax over all keys, head mean, then the image span), kept to show the test tells them apart."""
    qh, kh, vh = q[:, -1], k, v  # [H, d], [H, L, d], [H, L, d]
    if per_head:
        a = torch.softmax(torch.einsum("hd,hld->hl", qh, kh[:, img]) * scale, -1).mean(0)
        sem = torch.softmax(torch.einsum("hd,hld->hl", vh[:, -1], vh[:, img]) * scale, -1).mean(0)
    else:
        a = torch.softmax(torch.einsum("hd,hld->hl", qh, kh) * scale, -1).mean(0)[img]
        sem = torch.softmax(torch.einsum("hd,hld->hl", vh[:, -1], vh) * scale, -1).mean(0)[img]
    norm = vh[:, img].mean(0).abs().sum(-1)
    f = (a / a.sum() + sem / sem.sum()) * norm
    return f.topk(keep).indices.sort().values


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_flowcut_llm_stage_matches_the_reference_math(family):
    """Kept sets equal the reference's on fixed inputs: 3 samples (each alone, no padding) × up to 3 budgets."""
    model = _model(family)
    for sample in range(3):
        inputs = batch(family, [sample])
        t = _layer_qkv(model, inputs, 1)
        q, k, v = t["q"].float()[0], t["k"].float()[0], t["v"].float()[0]
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scale = t["scaling"] if t["scaling"] is not None else q.shape[-1] ** -0.5
        img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        for keep in (2, 3, 5):
            if keep >= img.numel():
                continue
            entry = _first_entry(model, inputs, method="flowcut", keep=keep, layer=2)
            assert entry.stage == "llm:2" and "flow_stats" in entry.signal
            assert torch.equal(entry.kept, _flowcut_reference(q, k, v, scale, img, keep)), (sample, keep)


def test_flowcut_llm_signal_normalises_each_head_over_the_image():
    """The probe's statistics are the reference's (per-head softmax over the image's keys, then the head mean), not
    the head mean of a softmax over every key: on inputs where heads put different mass on the text, the two rank
    the image's tokens differently, and vtprune's equals the reference's."""
    from vtprune.probes import flow_stats_over, last_flow_logits
    from vtprune.selectors.flowcut import flow_score

    g = torch.Generator().manual_seed(1)  # a fixed input on which the two rankings differ (seed 0's agree)
    h, n_txt, n_img, d = 4, 6, 12, 8
    q = torch.randn(1, h, n_txt + n_img, d, generator=g)
    k = torch.randn(1, h, n_txt + n_img, d, generator=g)
    k[0, 0, : n_txt - 1] = 3 * q[0, 0, -1]  # head 0 spends nearly all its attention on the text
    v = torch.randn(1, h, n_txt + n_img, d, generator=g)
    img = torch.arange(n_txt - 1, n_txt - 1 + n_img)  # the image sits between the text and the last (query) token
    logits = last_flow_logits(q, k, v, None, d ** -0.5, {})
    ours = flow_score(flow_stats_over(logits[..., img])).topk(5).indices.sort().values[0]
    assert torch.equal(ours, _flowcut_reference(q[0], k[0], v[0], d ** -0.5, img, 5))
    assert not torch.equal(ours, _flowcut_reference(q[0], k[0], v[0], d ** -0.5, img, 5, per_head=False))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_flowcut_without_a_vision_stage_runs_in_the_llm(family):
    """No in-encoder FlowCut for this tower: prune(method="flowcut") without a layer runs the LLM-stage variant at its
    default layer 2 (after decoder layer 1), says so in the report and keeps exactly ``keep`` per image, with the
    kept tokens' own positions (3-D M-RoPE columns on Qwen)."""
    model = _model(family)
    inputs = batch(family, [0])
    vtprune.prune(model, method="flowcut", keep=5)
    with torch.no_grad():
        out = model(**inputs).logits
    rep = vtprune.last_report(model)
    assert {e.stage for e in rep.images} == {"llm:2"} and all(e.n_after == 5 for e in rep.images)
    vtprune.unprune(model)
    vtprune.prune(model, method="flowcut", keep=5, layer=2)
    with torch.no_grad():
        same = model(**inputs).logits
    torch.testing.assert_close(out, same, rtol=0, atol=0)
    with pytest.raises(ValueError, match="compact"):
        vtprune.prune(vtprune.unprune(model), method="flowcut", keep=5, positions="compact")
    assert not vtprune.is_pruned(model)


def test_flowcut_on_llava_still_prunes_inside_the_vit():
    from vtprune.testing import tiny_llava

    model = tiny_llava("llava", vision_layers=5)[0]
    vtprune.prune(model, method="flowcut", keep=5)
    with torch.no_grad():
        model(**batch("llava", [0]))
    assert {e.stage for e in vtprune.last_report(model).images} == {"vision"}


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_pdrop_scores_with_the_boundary_layers_own_projections(family):
    """PyramidDrop (SELECTORS.md §7.4, invariant 2): a boundary at layer K is scored with layer K's own input norm,
    q/k projections and RoPE on the hidden states entering it — the last prompt token's softmax over all keys
    (causal), head mean, cut to the image — not with layer K−1's attention. Re-derived test-side from layer K's q/k
    in an eager run; 3 samples × 2 budgets, and the former signal (layer K−1) must disagree somewhere."""
    model = _model(family)
    former_differs = 0
    for sample in range(3):
        inputs = batch(family, [sample])
        img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        own, before = (_layer_qkv(model, inputs, k) for k in (1, 0))
        rows = []
        for t in (own, before):
            q, k = t["q"].float()[0], t["k"].float()[0]
            k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            scale = t["scaling"] if t["scaling"] is not None else q.shape[-1] ** -0.5
            rows.append(torch.softmax(torch.einsum("hd,hld->hl", q[:, -1], k) * scale, -1).mean(0)[img])
        for keep in (2, 4):
            if keep >= img.numel():
                continue
            expect = rows[0].topk(keep).indices.sort().values
            former_differs += not torch.equal(expect, rows[1].topk(keep).indices.sort().values)
            entry = _first_entry(model, inputs, method="pdrop", keep=keep, layer=1)
            assert entry.stage == "llm:1" and "layer_attention" in entry.signal
            assert torch.equal(entry.kept, expect), (sample, keep)
    assert former_differs > 0
