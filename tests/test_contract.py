"""The contract every adapter × method passes (ARCHITECTURE.md "Tests"). Families come from tests/families.py."""

from __future__ import annotations

import inspect

import pytest
import torch

import vtprune
from tests.families import (
    FAMILIES,
    batch,
    batch_invariant_positions,
    compact_positions,
    forward_positions,
    generated,
    model_and_processor,
    reference_mask,
    two_images,
    vision_impl,
)
from vtprune.registry import get_adapter_class, get_selector

KEEP = 6


def _applicable(family: str, method: str) -> bool:
    return set(get_selector(method).requires) <= set(get_adapter_class(family).provides)


# Every registered method that keeps a subset of the image's tokens before the LLM, on every family that provides
# its signals (merging selectors change features: tests/test_vflowopt.py; in-LLM stages: tests/test_llm_stages.py;
# in-ViT FlowCut: tests/test_flowcut.py). A family that cannot serve a method refuses it at prune() time (below).
SUBSET = [m for m in vtprune.list_methods() if "pre_llm" in get_selector(m).stages and not get_selector(m).merges]
CASES = [(f, m) for f in FAMILIES for m in SUBSET if _applicable(f, m)]
REFUSED = [(f, m) for f in FAMILIES for m in vtprune.list_methods()
           if "pre_llm" in get_selector(m).stages and not _applicable(f, m)]


@pytest.mark.parametrize("family,method", REFUSED)
def test_methods_a_family_cannot_serve_are_refused_at_prune_time(family, method):
    model, _ = model_and_processor(family)
    missing = sorted(set(get_selector(method).requires) - set(get_adapter_class(family).provides))
    with pytest.raises(ValueError, match=f"{method!r} needs the signal.*{missing[0]}"):
        vtprune.prune(model, method=method, keep=KEEP)
    assert not vtprune.is_pruned(model) and "generate" not in model.__dict__


def _suppressed(model) -> list[int]:
    # random weights may emit the image placeholder itself, which no model accepts back as text (use_cache=False),
    # or stop early on EOS in one run but not another; tests compare exactly 8 tokens
    eos = model.generation_config.eos_token_id
    return [model.config.image_token_id, *(eos if isinstance(eos, list) else [2 if eos is None else eos])]


def _gen(model, inputs, **kw):
    return model.generate(**inputs, max_new_tokens=8, do_sample=False, suppress_tokens=_suppressed(model), **kw)


def _kept_rows(report, b):
    """Original positions kept in sample b (the pruned sequence without padding)."""
    tm = report.token_map[b]
    return tm[tm >= 0]


@pytest.mark.parametrize("family,method", CASES)
def test_identity_keep_all(family, method):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_ids = _gen(model, inputs)
        vtprune.prune(model, method=method, keep=100_000)
        logits = model(**inputs).logits
        ids = _gen(model, inputs)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(ids, ref_ids)
    rep = vtprune.last_report(model)
    assert all(i.n_after == i.n_before for i in rep.images)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_images_runs_unchanged(family):
    model, proc = model_and_processor(family)
    inputs = proc.tokenizer(["user: hello there assistant:"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = _gen(model, inputs)
        vtprune.prune(model, method="divprune", keep=2)
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(_gen(model, inputs), ref_ids)
    assert vtprune.last_report(model) is None


def _reference_logits(family, model, inputs, report, positions: str):
    """Unpruned model on the full sequence, dropped image tokens masked out, kept tokens at their positions."""
    ids = inputs["input_ids"]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        keep[b, _kept_rows(report, b)] = True
    mask = inputs["attention_mask"] * keep
    with torch.no_grad():
        if positions == "preserve":
            pos = forward_positions(family, model, inputs)  # the unpruned prompt's own positions
        else:
            pos = compact_positions(family, mask, model)
    with vtprune.disabled(model), torch.no_grad():
        out = model(**{**inputs, "attention_mask": reference_mask(model, inputs, mask), "position_ids": pos}).logits
    return out, keep


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("family,method", CASES)
def test_matches_hand_built_reference(family, method, positions):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0])
    vtprune.prune(model, method=method, keep=KEEP, positions=positions)
    with torch.no_grad():
        pruned = model(**inputs).logits
    rep = vtprune.last_report(model)
    assert rep.visual_after < rep.visual_before
    ref, keep = _reference_logits(family, model, inputs, rep, positions)
    torch.testing.assert_close(pruned[0], ref[0][keep[0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,method", CASES)
def test_report_and_budget(family, method):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1, 2])
    vtprune.prune(model, method=method, keep=KEEP)
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    assert [(i.sample, i.image) for i in rep.images] == [(0, 0), (1, 0), (2, 0)]
    for im in rep.images:
        assert im.kept.dtype == torch.long
        assert torch.equal(im.kept, im.kept.sort().values) and im.kept.unique().numel() == im.n_after
        assert int(im.kept.max()) < im.n_before
        # the budget counts image tokens; LLaVA-NeXT newline tokens are kept on top only where the method says so
        forced = im.n_newline if vtprune.registry.get_selector(method).newlines == "keep" else 0
        n_layout = int(im.newline.sum()) if im.newline is not None and forced else 0
        assert im.n_after - forced == min(KEEP, im.n_before - n_layout)  # small images keep all they have
        assert im.method == method and im.stage == "pre_llm" and im.ms >= 0
    assert rep.flops_after < rep.flops_before
    assert "visual tokens" in str(rep)


@pytest.mark.parametrize("family,method", CASES)
def test_generate_returns_original_prompt_and_cache_parity(family, method):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    vtprune.prune(model, method=method, keep=KEEP)
    with torch.no_grad():
        out = _gen(model, inputs, output_logits=True, return_dict_in_generate=True)
        no_cache = _gen(model, inputs, use_cache=False, output_logits=True, return_dict_in_generate=True)
    n_in = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :n_in], inputs["input_ids"])
    assert out.sequences.shape[1] == n_in + 8
    assert torch.equal(out.sequences, no_cache.sequences)
    # logits too: on tiny random models greedy tokens alone can hide a wrong position or mask
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(no_cache.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,method", CASES)
def test_batch_equals_one_at_a_time(family, method):
    model, _ = model_and_processor(family)
    vtprune.prune(model, method=method, keep=KEEP)
    full = batch(family, [0, 1, 2])
    n_in = full["input_ids"].shape[1]
    kw = dict(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        res = _gen(model, full, **kw)
        rep_b = vtprune.last_report(model)
        for b in range(3):
            one = batch(family, [b])
            res_1 = _gen(model, one, **kw)
            rep_1 = vtprune.last_report(model)
            assert torch.equal(rep_1.images[0].kept, rep_b.images[b].kept)
            assert torch.equal(res.sequences[b, n_in:], res_1.sequences[0, one["input_ids"].shape[1]:])
            torch.testing.assert_close(torch.stack(res.logits)[:, b], torch.stack(res_1.logits)[:, 0], rtol=0,
                                       atol=1e-5)


@pytest.mark.parametrize("family,method", [(f, "fastervlm") for f in FAMILIES] + [(f, "divprune") for f in FAMILIES])
def test_forward_batch_logits_equal_single(family, method):
    """Left-padded batch with generate-style positions gives the same logits per kept token as one sample alone."""
    model, _ = model_and_processor(family)
    vtprune.prune(model, method=method, keep=KEEP)

    def pos(inp):
        return batch_invariant_positions(family, model, inp)

    full = batch(family, [0, 1, 2])
    with torch.no_grad():
        lb = model(**full, position_ids=pos(full)).logits
        rep_b = vtprune.last_report(model)
        for b in range(3):
            one = batch(family, [b])
            l1 = model(**one, position_ids=pos(one)).logits
            n1 = l1.shape[1]
            torch.testing.assert_close(lb[b, -n1:], l1[0], rtol=0, atol=1e-5)
            head = rep_b.token_map[b, :-n1]  # padding only: added (-1) or the caller's own padding
            assert ((head == -1) | (full["attention_mask"][b, head.clamp(min=0)] == 0)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_compacted(family):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    vtprune.prune(model, method="divprune", keep=KEEP)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    rep = vtprune.last_report(model)
    tm = rep.token_map
    exp = torch.where(tm >= 0, labels.gather(1, tm.clamp(min=0)), torch.full_like(tm, -100))
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    loss = torch.nn.functional.cross_entropy(logits, exp[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, loss)


@pytest.mark.parametrize("family,method", CASES)
def test_reversible(family, method):
    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_ids = _gen(model, inputs)
    keys = list(model.state_dict())
    dict_keys = set(model.__dict__)
    impl = vision_impl(model)
    hooks = dict(model._forward_pre_hooks)
    vtprune.prune(model, method=method, keep=KEEP)
    assert vtprune.is_pruned(model)
    with torch.no_grad():
        model(**inputs)
        assert vtprune.last_report(model).visual_after < vtprune.last_report(model).visual_before
        with vtprune.disabled(model):
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(_gen(model, inputs), ref_ids)
        assert not torch.equal(model(**inputs).logits[:, -1], ref[:, -1])  # pruned again after the block
    vtprune.unprune(model)
    assert not vtprune.is_pruned(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(_gen(model, inputs), ref_ids)
    assert list(model.state_dict()) == keys
    assert set(model.__dict__) == dict_keys
    assert vision_impl(model) == impl
    assert dict(model._forward_pre_hooks) == hooks
    assert model.generate.__func__ is type(model).generate


@pytest.mark.filterwarnings("ignore:The following device_map keys")
@pytest.mark.parametrize("family", FAMILIES)
def test_with_accelerate_hooks(family):
    from accelerate import dispatch_model

    model, _ = model_and_processor(family)
    inputs = batch(family, [0, 1])
    vtprune.prune(model, method="fastervlm", keep=KEEP)
    with torch.no_grad():
        plain = model(**inputs).logits
        plain_ids = _gen(model, inputs)
    vtprune.unprune(model)
    # one entry per direct child of model.model (+ bare parameters such as LLaVA-NeXT's image_newline)
    device_map = {f"model.{n}": "cpu" for n, _ in model.model.named_children()}
    device_map.update({f"model.{n}": "cpu" for n, _ in model.model.named_parameters(recurse=False)})
    device_map["lm_head"] = "cpu"
    dispatch_model(model, device_map=device_map, force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in model.model.children())
    vtprune.prune(model, method="fastervlm", keep=KEEP)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)
        assert torch.equal(_gen(model, inputs), plain_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_agnostic_selectors_ignore_the_question(family):
    from tests.families import FAMILY, _build, prompt
    from vtprune.testing import tiny_image

    model, proc = model_and_processor(family)
    img = tiny_image(*FAMILY[family][3][0], seed=3)
    vtprune.prune(model, method="fastervlm", keep=KEEP)
    kept = []
    for q in ["what colour?", "how many shapes are there?"]:
        with torch.no_grad():
            model(**_build(family)[1](images=[img], text=[prompt(family, q)], return_tensors="pt"))
        kept.append(vtprune.last_report(model).images[0].kept)
    assert torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_one_prompt_get_their_own_budget(family):
    model, _ = model_and_processor(family)
    inputs = two_images(family)
    vtprune.prune(model, method="divprune", keep=3)
    with torch.no_grad():
        out = model(**inputs).logits
    rep = vtprune.last_report(model)
    assert [(i.sample, i.image, i.n_after) for i in rep.images] == [(0, 0, 3), (0, 1, 3)]
    assert out.shape[1] == inputs["input_ids"].shape[1] - sum(i.n_before - i.n_after for i in rep.images)


@pytest.mark.parametrize("positions", ["preserve", "compact"])
@pytest.mark.parametrize("family", FAMILIES)
def test_callers_own_decode_loop_matches_generate(family, positions):
    """A hand-written greedy loop (forward + KV cache, masks on the original lengths) equals generate per logit."""
    model, _ = model_and_processor(family)
    inputs = batch(family, [0])
    vtprune.prune(model, method="divprune", keep=KEEP, positions=positions)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        # transformers >= 5.24 names the cache argument and output field `cache` (`past_key_values` is deprecated)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(**inputs, use_cache=True)
        cache, mask = getattr(out, name), inputs["attention_mask"]
        logits = [out.logits[:, -1]]
        for _ in range(5):
            tok = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(input_ids=tok, attention_mask=mask, use_cache=True, **{name: cache})
            cache = getattr(out, name)
            logits.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(logits), torch.stack(ref.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,method", [(f, m) for f in FAMILIES for m in ("fastervlm", "divprune")])
def test_generate_equals_hand_built_reference_decode(family, method):
    """8 greedy tokens of the pruned model == the unpruned model run step by step on the full sequence with the
    dropped image tokens masked and every position (prompt and new tokens) as the unpruned prompt has it."""
    model, _ = model_and_processor(family)
    inputs = batch(family, [0])
    vtprune.prune(model, method=method, keep=KEEP)
    with torch.no_grad():
        out = _gen(model, inputs, output_logits=True, return_dict_in_generate=True)
    rep = vtprune.last_report(model)
    ids = inputs["input_ids"]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, _kept_rows(rep, 0)] = True
    mask = inputs["attention_mask"] * keep
    with torch.no_grad():
        pos = forward_positions(family, model, inputs)
    ref_logits = []
    with vtprune.disabled(model), torch.no_grad():
        for _ in range(8):
            step = {**inputs, "input_ids": ids, "position_ids": pos}
            logits = model(**{**step, "attention_mask": reference_mask(model, step, mask)}).logits[:, -1]
            logits[:, _suppressed(model)] = float("-inf")  # as suppress_tokens does
            ref_logits.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, tok], 1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
            inputs = generated(model, inputs)  # token type ids of the new token, as generate sets them
    n_in = inputs["input_ids"].shape[1]
    assert torch.equal(out.sequences[0, n_in:], ids[0, n_in:])
    got = torch.stack(out.logits)
    ref = torch.stack(ref_logits)
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_different_image_counts_equals_one_at_a_time(family):
    from tests.families import FAMILY, _build, prompt
    from vtprune.testing import tiny_image

    model, _ = model_and_processor(family)
    proc = _build(family)[1]
    sizes = FAMILY[family][3]
    imgs = [tiny_image(*sizes[0], seed=5), tiny_image(*sizes[2], seed=6), tiny_image(*sizes[1], seed=7)]
    texts = [prompt(family, "compare these two", 2), prompt(family, "what is it?", 1)]
    vtprune.prune(model, method="fastervlm", keep=4)
    kw = dict(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        both = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
        res = _gen(model, both, **kw)
        rep = vtprune.last_report(model)
        assert [(i.sample, i.image) for i in rep.images] == [(0, 0), (0, 1), (1, 0)]
        singles = [proc(images=imgs[:2], text=texts[:1], return_tensors="pt"),
                   proc(images=imgs[2:], text=texts[1:], return_tensors="pt")]
        kept_single = []
        for b, one in enumerate(singles):
            r1 = _gen(model, one, **kw)
            kept_single += [i.kept for i in vtprune.last_report(model).images]
            torch.testing.assert_close(torch.stack(res.logits)[:, b], torch.stack(r1.logits)[:, 0], rtol=0, atol=1e-5)
    for a, b in zip(rep.images, kept_single):
        assert torch.equal(a.kept, b)
