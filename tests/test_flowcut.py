"""FlowCut inside the vision encoder: exactly `keep` patches reach the projector, and the pruned tower equals a
test-side encoder loop that computes the same statistics by hand and drops the same tokens."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.selectors.flowcut import cut_amount
from vtprune.testing import tiny_image, tiny_internvl, tiny_llava


def _model():
    return tiny_llava("llava", vision_layers=5)  # features read at layer 3: pruning after layers 0..2


def _hand_loop(model, pixel_values, target):
    """CLIP encoder run by hand: eager statistics per layer, FlowCut schedule, [CLS] kept in front."""
    vt = model.model.vision_tower
    layers = vt.encoder.layers
    read = len(layers) - 2
    h = vt.pre_layrnorm(vt.embeddings(pixel_values))
    idx = torch.arange(h.shape[1] - 1)
    cum = None
    for i in range(read + 1):
        attn = layers[i].self_attn
        x = layers[i].layer_norm1(h)
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
        h = layers[i](h, None)
        if i == read:
            break
        a = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, -1)[:, :, 0].mean(1)[:, 1:]
        s = torch.softmax((v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0], -1).mean(1)[:, 1:]
        nrm = v.mean(1).abs().sum(-1)[:, 1:]
        f = (a / a.sum() + s / s.sum()) * nrm
        n_cur = a.shape[1]
        if n_cur <= target:
            continue
        cum = f if cum is None else 0.5 * cum + 0.5 * f
        rho = (read - 1) - i
        if rho % 2:
            continue
        if rho > 0:
            p = a / a.sum()
            ent = float(-(p * p.log()).sum())
            amount = round((n_cur - target) / math.sqrt(rho) * (1 - (ent / math.log(n_cur)) ** 2))
            new = max(n_cur - amount, target)
        else:
            new = target
        keep = torch.sort(cum[0], descending=True, stable=True).indices[:new].sort().values
        h = torch.cat([h[:, :1], h[:, 1:][:, keep]], 1)
        cum, idx = cum[:, keep], idx[keep]
    return model.model.multi_modal_projector(h[:, 1:]), idx


def _flowcut_run(model, inputs, keep):
    """One forward pruned by in-tower FlowCut: (the projector's outputs, one per call; the report)."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: seen.append(o))
    vtprune.prune(model, method="flowcut", keep=keep)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen, vtprune.last_report(model)


def test_flowcut_equals_a_test_side_encoder_loop_and_keeps_exactly_keep():
    model, proc = _model()
    imgs = [tiny_image(60, 60, seed=s) for s in (0, 1)]
    inputs = proc(images=imgs, text=["USER: <image>\nwhat? ASSISTANT:"] * 2, return_tensors="pt", padding=True)
    seen, rep = _flowcut_run(model, inputs, 5)
    assert [im.n_after for im in rep.images] == [5, 5] and rep.stage == "vision"
    with torch.no_grad():
        for b in range(2):
            feats, idx = _hand_loop(model, inputs["pixel_values"][b:b + 1], 5)
            assert torch.equal(rep.images[b].kept, idx)
            torch.testing.assert_close(seen[b][0], feats[0], rtol=0, atol=1e-5)
            # the tower really ran on fewer tokens: features differ from the unpruned tower's at the same indices
            with vtprune.disabled(model):
                full = model.model.get_image_features(pixel_values=inputs["pixel_values"][b:b + 1]).pooler_output[0]
            assert not torch.allclose(full[idx], feats[0], atol=1e-4)


def _generate_parity(model, proc, imgs, texts, keep):
    """Pruned generate: cached = uncached logits, the batch = each sample alone, ``keep`` tokens per image."""
    vtprune.prune(model, method="flowcut", keep=keep)
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
              suppress_tokens=[model.config.image_token_id, model.generation_config.eos_token_id or 2])
    with torch.no_grad():
        both = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
        a = model.generate(**both, **kw)
        assert [im.n_after for im in vtprune.last_report(model).images] == [keep] * len(imgs)
        b = model.generate(**both, use_cache=False, **kw)
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0, atol=1e-5)
        for s in range(len(imgs)):
            one = model.generate(**proc(images=imgs[s:s + 1], text=texts[s:s + 1], return_tensors="pt"), **kw)
            torch.testing.assert_close(torch.stack(a.logits)[:, s], torch.stack(one.logits)[:, 0], rtol=0,
                                       atol=1e-5)


def test_flowcut_generate_cache_parity_and_batch_equals_single():
    model, proc = _model()
    _generate_parity(model, proc, [tiny_image(60, 60, seed=s) for s in (3, 4)],
                     ["USER: <image>\nwhat colour? ASSISTANT:", "USER: <image>\nhow many shapes are there? ASSISTANT:"],
                     keep=4)


def _internvl():
    model, proc = tiny_internvl(vision_layers=5, image_size=112, text_layers=3)  # 8x8 patches -> 16 tokens a tile
    for layer in model.model.vision_tower.encoder.layer:  # init layer scale 0.1 hides what attention mixes in
        layer.lambda_1.data.fill_(1.0)
        layer.lambda_2.data.fill_(1.0)
    return model, proc


INTERNVL_PROMPT = "user: <IMG_CONTEXT>\nwhat colour? assistant:"


def _internvl_hand_loop(model, tile, target):
    """InternViT run by hand on one tile: eager statistics per layer, FlowCut schedule over whole 2x2 blocks (block
    (i, j) = patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)), the kept patches scattered back onto the full
    grid before the model's pixel shuffle. Returns the kept blocks' LLM features and the kept block indices."""
    vt, base = model.model.vision_tower, model.model
    layers = vt.encoder.layer
    read = len(layers) - 1
    h = vt.embeddings(tile)
    side = int(round((h.shape[1] - 1) ** 0.5))
    half = side // 2
    blocks = torch.tensor([[(2 * i + di) * side + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
                           for i in range(half) for j in range(half)])
    units = torch.arange(blocks.shape[0])
    cum = None
    for i in range(read + 1):
        attn = layers[i].attention
        x = layers[i].layernorm_before(h)
        b, t, _ = x.shape
        q = attn.q_norm(attn.q_proj(x)).view(b, t, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x)).view(b, t, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, attn.num_heads, -1).transpose(1, 2)
        h = layers[i](h)
        if i == read or units.numel() <= target:
            continue
        patches = blocks[units].flatten().sort().values
        pos = torch.searchsorted(patches, blocks[units])  # each kept block's patches in the current sequence
        a = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, -1)[:, :, 0].mean(1)[0, 1:]
        s = torch.softmax((v[:, :, :1] @ v.transpose(-1, -2))[:, :, 0], -1).mean(1)[0, 1:]
        nrm = v.mean(1).abs().sum(-1)[0, 1:]
        f = ((a / a.sum() + s / s.sum()) * nrm)[pos].sum(-1)
        cum = f if cum is None else 0.5 * cum + 0.5 * f
        rho = (read - 1) - i
        if rho % 2:
            continue
        if rho > 0:
            p = a[pos].sum(-1)
            p = p / p.sum()
            ent = float(-(p * p.log()).sum())
            n_cur = units.numel()
            new = max(n_cur - round((n_cur - target) / math.sqrt(rho) * (1 - (ent / math.log(n_cur)) ** 2)), target)
        else:
            new = target
        keep = torch.sort(cum, descending=True, stable=True).indices[:new].sort().values
        units, cum = units[keep], cum[keep]
        rows = torch.searchsorted(patches, blocks[units].flatten().sort().values)
        h = torch.cat([h[:, :1], h[:, 1:][:, rows]], 1)
    full = h.new_zeros(1, side * side, h.shape[-1])
    full[:, blocks[units].flatten().sort().values] = h[:, 1:]
    feats = base.pixel_shuffle(vt.layernorm(full).view(1, side, side, -1), 0.5).reshape(1, -1, 4 * h.shape[-1])
    return base.multi_modal_projector(feats)[0, units], units


def test_internvl_flowcut_prunes_whole_blocks_inside_internvit():
    """Exactly ``keep`` tokens per image (a multi-tile image splits it over its tiles), each the shuffle of a 2x2
    block that survived the tower, equal to a test-side InternViT loop; the tower really ran on fewer tokens."""
    model, proc = _internvl()
    imgs = [tiny_image(200, 100, seed=0), tiny_image(112, 112, seed=1)]  # 2 crops + thumbnail; one tile
    inputs = proc(images=imgs, text=[INTERNVL_PROMPT] * 2, return_tensors="pt", padding=True)
    seen, rep = _flowcut_run(model, inputs, 7)
    assert [(im.stage, im.n_before, im.n_after) for im in rep.images] == [("vision", 48, 7), ("vision", 16, 7)]
    with torch.no_grad():
        targets = [3, 2, 2, 7]  # 7 over three tiles: the first tile takes the remainder
        kept = []
        for t, target in enumerate(targets):
            tile = inputs["pixel_values"][t:t + 1]
            feats, units = _internvl_hand_loop(model, tile, target)
            assert units.numel() == target
            torch.testing.assert_close(seen[t][0, units], feats, rtol=0, atol=1e-5)
            kept.append(units + 16 * t if t < 3 else units)
            with vtprune.disabled(model):
                full = model.model.get_image_features(pixel_values=tile, vision_feature_layer=-1,
                                                      vision_feature_select_strategy="default").pooler_output[0]
            assert not torch.allclose(full[units], feats, atol=1e-4)
        assert torch.equal(rep.images[0].kept, torch.cat(kept[:3])) and torch.equal(rep.images[1].kept, kept[3])


def test_internvl_flowcut_generate_cache_parity_and_batch_equals_single():
    model, proc = _internvl()
    _generate_parity(model, proc, [tiny_image(200, 100, seed=3), tiny_image(112, 112, seed=4)],
                     [INTERNVL_PROMPT, "user: <IMG_CONTEXT>\nhow many shapes are there? assistant:"], keep=5)


def test_internvl_flowcut_refuses_other_feature_layers():
    model, proc = _internvl()
    inputs = proc(images=[tiny_image(112, 112, seed=0)], text=[INTERNVL_PROMPT], return_tensors="pt")
    vtprune.prune(model, method="flowcut", keep=5)
    with torch.no_grad(), pytest.raises(ValueError, match="vision_feature_layer=-1"):
        model(**inputs, vision_feature_layer=-2)
    # a checkpoint whose projector reads another layer gets the LLM-stage variant, and the report says so
    vtprune.unprune(model)
    model.config.vision_feature_layer = -2
    vtprune.prune(model, method="flowcut", keep=5)
    with torch.no_grad():
        model(**inputs)
    assert [(im.stage, im.n_after) for im in vtprune.last_report(model).images] == [("llm:2", 5)]


def test_cut_amount_schedule():
    uniform = torch.full((1, 100), 0.01)
    assert cut_amount(uniform, 10, 4) == 0  # maximal entropy: nothing removed before the last step
    peaked = torch.full((1, 100), 1e-6)
    peaked[0, 3] = 1.0
    assert cut_amount(peaked, 10, 4) <= round(90 / 2)
    assert cut_amount(peaked, 10, 4) > 0
    assert cut_amount(uniform, 10, 0) == 90  # last pruning layer: straight to the target


def test_encoder_benchmark_harness(tmp_path):
    """evals/bench_flowcut_encoder.py on its tiny shapes: FlowCut ran inside both towers, kept exactly the budget,
    and the tower processed fewer tokens than unpruned; the results file is written."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
    import bench_flowcut_encoder as bench

    res = bench.main(["--repeats", "1", "--shapes", "tiny-llava,tiny-internvl", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == res["rows"]
    assert [(r["shape"], r["tiles"], r["visual_tokens"], r["keep"], r["flowcut_stage"]) for r in res["rows"]] == [
        ("tiny-llava", 1, 64, 16, "vision"), ("tiny-internvl", 3, 48, 12, "vision")]
    assert all(0 < r["flowcut_tower_tokens"] < 1 and r["unpruned_ms"] > 0 for r in res["rows"])
    with pytest.raises(SystemExit, match="valid: demo-llava"):
        bench.main(["--shapes", "nope"])
