"""π0 (a robot policy): pre_llm pruning of the prefix, one budget per camera, through ``sample_actions`` and the
training forward, checked against the unpruned policy.

The reference for a pruned call is the unpruned policy running the same user call with the dropped prefix entries
masked out of every attention — the VLM's 2-D mask, and the action expert's block mask (its columns over the prefix
cache) — so its positions are the unpruned ones everywhere. π0 is routed out of the text-generation test matrix by
its adapter's ``policy`` flag (tests/families.py); these are its contract tests.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

import vtprune
from vtprune.testing.pi0 import fixed_noise, policy_inputs, tiny_pi0

T = 16  # SigLIP tokens per camera of the tiny policy (56 px / 14)
KEEP = 4
MASKED = ["divprune", "fastervlm", "random", "uniform", "holov"]  # pure selection: pruned == masked reference


@functools.cache
def _built(text_layers: int):
    return tiny_pi0(text_layers=text_layers)


def _policy(text_layers: int = 2):
    model, proc = _built(text_layers)
    return copy.deepcopy(model), proc


def _inputs(proc, cameras=(2, 1), absent_first: bool = True) -> dict:
    """Two samples: both cameras, and one camera; with ``absent_first`` the one camera sits in slot 1 (slot 0 absent),
    a layout the processor never makes but the model takes (the r-th image token belongs to the r // T-th present
    camera)."""
    out = policy_inputs(proc, list(cameras))
    if absent_first and len(cameras) > 1 and cameras[1] == 1:
        pv, cams = out["pixel_values"].clone(), out["pixel_attention_mask"].clone()
        pv[1, 1], pv[1, 0] = pv[1, 0], 0
        cams[1] = torch.tensor([False, True])
        out["pixel_values"], out["pixel_attention_mask"] = pv, cams
    return out


def _kept_mask(rep, length: int) -> torch.Tensor:
    """BoolTensor[B, L]: the caller's prefix positions the pruned call kept (the report's token map)."""
    tm = rep.token_map
    keep = torch.zeros(tm.shape[0], length, dtype=torch.bool)
    for b in range(tm.shape[0]):
        keep[b, tm[b][tm[b] >= 0]] = True
    return keep


@contextlib.contextmanager
def _masked(model, keep: torch.Tensor, seen: dict | None = None):
    """The unpruned policy with the prefix positions where ``keep`` is False masked out of every attention: the
    VLM's 2-D mask, and the action expert's 4-D block mask over the prefix cache (positions stay the unpruned ones).
    ``seen`` collects the expert's position ids."""

    def vlm_pre(mod, args, kw):
        m = kw["attention_mask"]
        return args, {**kw, "attention_mask": keep.long() if m is None else m * keep.to(m)}

    def dit_pre(mod, args, kw):
        m4 = kw["attention_mask"]
        assert m4 is not None and m4.dtype == torch.bool and m4.dim() == 4
        cols = torch.ones(m4.shape[0], m4.shape[-1], dtype=torch.bool)
        cols[:, : keep.shape[1]] = keep
        if seen is not None:
            seen.setdefault("dit_positions", []).append(kw["position_ids"])
        return args, {**kw, "attention_mask": m4 & cols[:, None, None, :]}

    handles = [model.model.vlm.register_forward_pre_hook(vlm_pre, with_kwargs=True),
               model.model.dit.register_forward_pre_hook(dit_pre, with_kwargs=True)]
    try:
        with vtprune.disabled(model) if vtprune.is_pruned(model) else contextlib.nullcontext():
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _watch(model, seen: dict):
    """Record what the VLM prefix call and the action expert receive (registered after vtprune's hooks)."""
    hs = [model.model.vlm.register_forward_pre_hook(lambda m, a, k: seen.setdefault("vlm", []).append(k),
                                                    with_kwargs=True),
          model.model.dit.register_forward_pre_hook(
              lambda m, a, k: seen.setdefault("dit_positions", []).append(k["position_ids"]), with_kwargs=True)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _train_call(model, inputs, noise):
    gen = torch.Generator().manual_seed(1)
    actions = torch.randn(noise.shape, generator=gen)
    return model(**inputs, noise=noise, timestep=torch.tensor([0.7, 0.3]), actions=actions)


def test_pi0_is_routed_to_its_own_tests_by_the_policy_flag():
    from tests.families import FAMILIES, MISSING, POLICIES

    assert "pi0" in POLICIES and "pi0" not in FAMILIES and not MISSING
    assert vtprune.registry.get_adapter_class("pi0").policy is True
    assert not any(getattr(vtprune.registry.get_adapter_class(f), "policy", False) for f in FAMILIES)


@pytest.mark.parametrize("keep", [T, 1.0])
def test_keep_all_is_bit_identical(keep):
    """A budget of all the tokens per camera (keep=T or keep_ratio=1) keeps every token: actions, the training loss
    and its gradients are the unpruned policy's, bit for bit; the report lists every camera with all its tokens."""
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    ref = model.sample_actions(**inputs, noise=noise)
    ref_loss = _train_call(model, inputs, noise).loss
    vtprune.prune(model, method="divprune", **({"keep": keep} if isinstance(keep, int) else {"keep_ratio": keep}))
    assert torch.equal(model.sample_actions(**inputs, noise=noise), ref)
    rep = vtprune.last_report(model)
    assert [(i.sample, i.image, i.n_before, i.n_after) for i in rep.images] == [(0, 0, T, T), (0, 1, T, T),
                                                                                 (1, 1, T, T)]
    assert rep.tokens_after == rep.tokens_before
    assert torch.equal(_train_call(model, inputs, noise).loss, ref_loss)


@pytest.mark.parametrize("method", MASKED)
def test_pruned_actions_equal_the_masked_reference(method):
    """sample_actions on a padded batch (2 cameras; 1 camera in slot 1): exactly KEEP tokens per present camera reach
    the VLM at their original positions, the expert's positions are the unpruned ones, and the actions equal the
    unpruned policy's with the dropped prefix entries masked out of every attention."""
    model, proc = _policy()
    inputs = _inputs(proc)
    mask = inputs["attention_mask"]
    noise = fixed_noise(model, 2)
    vtprune.prune(model, method=method, keep=KEEP)
    seen: dict = {}
    with _watch(model, seen):
        got = model.sample_actions(**inputs, noise=noise)
    rep = vtprune.last_report(model)
    assert [(i.sample, i.image, i.n_after) for i in rep.images] == [(0, 0, KEEP), (0, 1, KEEP), (1, 1, KEEP)]
    assert all(i.kept.tolist() == sorted(set(i.kept.tolist())) for i in rep.images)
    dropped = torch.tensor([2 * (T - KEEP), T - KEEP])
    assert rep.tokens_after == (mask.sum(1) - dropped).tolist()
    # the VLM got the kept prefix: kept tokens at their unpruned positions (cumsum of the caller's mask - 1)
    vlm = seen["vlm"][0]
    tm = rep.token_map
    assert vlm["inputs_embeds"].shape[1] == tm.shape[1] < mask.shape[1]
    real = tm >= 0
    orig_pos = mask.cumsum(-1) - 1
    assert torch.equal(vlm["position_ids"][real], orig_pos.gather(1, tm.clamp(min=0))[real])
    assert torch.equal(vlm["attention_mask"], (mask.gather(1, tm.clamp(min=0)) * real).to(mask))
    n_img = (inputs["input_ids"] == model.config.vlm_config.image_token_id).gather(1, tm.clamp(min=0)) & real
    assert n_img.sum(1).tolist() == [2 * KEEP, KEEP]

    keep = _kept_mask(rep, mask.shape[1])
    ref_seen: dict = {}
    with _masked(model, keep, ref_seen):
        ref = model.sample_actions(**inputs, noise=noise)
    assert len(seen["dit_positions"]) == len(ref_seen["dit_positions"]) == model.config.num_inference_steps
    for p, r in zip(seen["dit_positions"], ref_seen["dit_positions"]):
        assert torch.equal(p, r)  # the action tokens' positions follow the unpruned prefix
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with vtprune.disabled(model):
        assert not torch.allclose(model.sample_actions(**inputs, noise=noise), got, atol=1e-3)  # pruning mattered


def test_a_call_without_attention_mask_keeps_the_vlms_own_positions():
    """Without attention_mask the VLM counts positions from 1 itself (PaliGemma) and the expert continues after the
    prefix length: the kept tokens get those positions and the actions equal the masked reference's."""
    model, proc = _policy()
    inputs = {k: v[:1] for k, v in _inputs(proc).items() if k != "attention_mask"}
    noise = fixed_noise(model, 1)
    vtprune.prune(model, method="divprune", keep=KEEP)
    seen: dict = {}
    with _watch(model, seen):
        got = model.sample_actions(**inputs, noise=noise)
    rep = vtprune.last_report(model)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(seen["vlm"][0]["position_ids"], rep.token_map + 1)
    ref_seen: dict = {}
    with _masked(model, _kept_mask(rep, length), ref_seen):
        ref = model.sample_actions(**inputs, noise=noise)
    expert = torch.arange(length, length + model.config.chunk_size + 1)[None]  # the state token, then the actions
    assert all(torch.equal(p, expert) for p in seen["dit_positions"])
    assert all(r is None for r in ref_seen["dit_positions"])  # the unpruned expert's default: the same positions
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_vflowopt_runs_with_its_summaries_in_the_kept_slots():
    """vflowopt replaces kept tokens by group summaries (not a mask of the unpruned run): KEEP per camera, the slots
    at the kept positions, finite actions that differ from the pure-selection run."""
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    vtprune.prune(model, method="vflowopt", keep=KEEP)
    seen: dict = {}
    with _watch(model, seen):
        got = model.sample_actions(**inputs, noise=noise)
    rep = vtprune.last_report(model)
    assert [i.n_after for i in rep.images] == [KEEP] * 3 and bool(torch.isfinite(got).all())
    keep = _kept_mask(rep, inputs["input_ids"].shape[1])
    with _masked(model, keep):
        masked = model.sample_actions(**inputs, noise=noise)
    assert not torch.allclose(got, masked, atol=1e-4)


@pytest.mark.parametrize("method", ["divprune", "random"])
def test_batch_equals_each_sample_alone(method):
    """Samples with different cameras present (and prompt lengths) give in a batch what they give alone: the same
    kept tokens per camera and the same actions."""
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    vtprune.prune(model, method=method, keep=KEEP)
    both = model.sample_actions(**inputs, noise=noise)
    kept = {(i.sample, i.image): i.kept for i in vtprune.last_report(model).images}
    for b in range(2):
        n = int(inputs["attention_mask"][b].sum())  # right padding: a sample alone has none
        alone = {k: v[b:b + 1, :n] if k in ("input_ids", "attention_mask") else v[b:b + 1]
                 for k, v in inputs.items()}
        out = model.sample_actions(**alone, noise=noise[b:b + 1])
        torch.testing.assert_close(out[0], both[b], rtol=1e-5, atol=1e-5)
        for i in vtprune.last_report(model).images:
            assert i.sample == 0 and torch.equal(i.kept, kept[(b, i.image)])


def test_training_forward_prunes_the_same_way_and_trains_through_the_kept_tokens():
    """policy(..., actions=...) with gradients on: the loss equals the masked unpruned policy's (same timestep,
    noise, actions), the kept tokens are the ones sample_actions keeps, and gradients reach the vision tower."""
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    vtprune.prune(model, method="divprune", keep=KEEP)
    assert torch.is_grad_enabled()
    out = _train_call(model, inputs, noise)
    rep = vtprune.last_report(model)
    model.sample_actions(**inputs, noise=noise)  # no torch.no_grad() around it, as users call it
    assert [i.kept.tolist() for i in vtprune.last_report(model).images] == [i.kept.tolist() for i in rep.images]
    out.loss.backward()
    tower = model.model.vlm.vision_tower
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tower.parameters() if p.requires_grad)
    with torch.no_grad(), _masked(model, _kept_mask(rep, inputs["input_ids"].shape[1])):
        ref = _train_call(model, inputs, noise)
    torch.testing.assert_close(out.loss.detach(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits.detach(), ref.logits, rtol=1e-5, atol=1e-5)


def test_unprune_restores_everything():
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    ref = model.sample_actions(**inputs, noise=noise)
    keys = list(model.state_dict())
    modules = [model, model.model, model.model.vlm, model.model.dit]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    impl = model.config.vlm_config.vision_config._attn_implementation
    vtprune.prune(model, method="fastervlm", keep=KEEP)  # installs the SigLIP probe too
    assert "sample_actions" in model.__dict__
    assert model.config.vlm_config.vision_config._attn_implementation != impl
    pruned = model.sample_actions(**inputs, noise=noise)
    assert not torch.equal(pruned, ref)
    vtprune.unprune(model)
    assert "sample_actions" not in model.__dict__ and not vtprune.is_pruned(model)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hooks
    assert model.config.vlm_config.vision_config._attn_implementation == impl
    assert list(model.state_dict()) == keys
    assert torch.equal(model.sample_actions(**inputs, noise=noise), ref)


def test_deepcopy_is_an_independent_pruned_policy():
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    vtprune.prune(model, method="divprune", keep=KEEP)
    ref = model.sample_actions(**inputs, noise=noise)
    ref_rep = vtprune.last_report(model)
    twin = copy.deepcopy(model)
    assert vtprune.is_pruned(twin) and vtprune.last_report(twin) is None
    assert twin.sample_actions.model is twin
    assert torch.equal(twin.sample_actions(**inputs, noise=noise), ref)
    assert vtprune.last_report(twin) is not None and vtprune.last_report(model) is ref_rep
    vtprune.unprune(twin)
    with vtprune.disabled(model):
        unpruned = model.sample_actions(**inputs, noise=noise)
    assert torch.equal(twin.sample_actions(**inputs, noise=noise), unpruned)
    assert torch.equal(model.sample_actions(**inputs, noise=noise), ref) and vtprune.is_pruned(model)


def _bad_layouts(inputs) -> list[tuple[dict, str]]:
    """(inputs, words the error must say): camera layouts π0 cannot read."""
    ids = inputs["input_ids"].clone()
    ids[0, 0] = 5  # one image token of sample 0 gone: 31 is not 16 per camera
    cams = inputs["pixel_attention_mask"].clone()
    cams[0, 1] = False  # sample 0 has 32 image tokens for one present camera
    return [({**inputs, "input_ids": ids}, r"31 image tokens but 2 present cameras.*16 image tokens \(tokens_per_"),
            ({**inputs, "pixel_attention_mask": cams}, "32 image tokens but 1 present cameras"),
            ({**inputs, "pixel_values": inputs["pixel_values"][:, :1]}, r"pixel_values .* must be \[batch, cameras")]


def test_bad_input_raises_clearly_and_leaves_the_policy_usable():
    """Camera layouts π0 cannot read raise a ValueError naming the counts (sample_actions and the training forward);
    the inner model called directly raises too; the policy works afterwards."""
    model, proc = _policy()
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    vtprune.prune(model, method="divprune", keep=KEEP)
    good = model.sample_actions(**inputs, noise=noise)
    for bad, words in _bad_layouts(inputs):
        with pytest.raises(ValueError, match=words):
            model.sample_actions(**bad, noise=noise)
        with pytest.raises(ValueError, match=words):
            _train_call(model, bad, noise)
    with pytest.raises(ValueError, match="model's own call"):  # the inner model bypasses the policy's own call
        model.model(action_embeds=torch.zeros(2, 5, 64), input_ids=inputs["input_ids"],
                    pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"])
    assert torch.equal(model.sample_actions(**inputs, noise=noise), good)


@pytest.mark.parametrize("config", [{"method": "globalcom2", "keep": KEEP}, {"method": "divprune", "keep": T + 1},
                                    {"method": "fastv", "keep": 100, "layer": 1}])
def test_unsupported_stages_are_refused_at_prune(config):
    """Signals SigLIP cannot give (globalcom2's [CLS] logits) and budgets above the tokens per camera (every camera
    has exactly T: a larger keep is a mistake, not a request to keep all) raise at prune() and leave the policy
    untouched."""
    model, proc = _policy(text_layers=3)
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    ref = model.sample_actions(**inputs, noise=noise)
    impl = model.config.vlm_config.vision_config._attn_implementation
    with pytest.raises(ValueError, match="pi0|cannot provide") as err:
        vtprune.prune(model, **config)
    assert config["method"] == "globalcom2" or f"keep={config['keep']} exceeds the {T} SigLIP tokens" in str(err.value)
    assert not vtprune.is_pruned(model) and "sample_actions" not in model.__dict__
    assert model.config.vlm_config.vision_config._attn_implementation == impl
    assert not model.model.vlm._forward_pre_hooks and not model.model.dit._forward_pre_hooks
    assert torch.equal(model.sample_actions(**inputs, noise=noise), ref)


def _per_layer_masked(model, keep: torch.Tensor, first: int):
    """The unpruned policy where decoder layers >= ``first`` of the VLM (its prefix pass) and of the action expert
    (its passes over the prefix cache, layer i reading cache layer i) do not attend to the prefix positions where
    ``keep`` is False — what an llm:K stage means; layers < K see everything."""

    def hook(mod, args, kw):
        m = kw.get("attention_mask")
        hidden = args[0] if args else kw["hidden_states"]
        b, q = hidden.shape[:2]
        kv = m.shape[-1] if m is not None else q
        if m is None:
            m = torch.ones(b, 1, q, kv, dtype=torch.bool)
        cols = torch.ones(b, kv, dtype=torch.bool)
        cols[:, : keep.shape[1]] = keep
        return args, {**kw, "attention_mask": m & cols[:, None, None, :]}

    layers = [*model.model.vlm.language_model.layers[first:], *model.model.dit.layers[first:]]
    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]


@pytest.mark.parametrize("method", ["fastv", "flowcut", "vla_pruner"])
def test_in_llm_stages_match_a_per_layer_masked_reference(method):
    """fastv / flowcut's LLM variant / vla_pruner at layer 1 of π0 (the last prompt token is the last real one of the
    right-padded prefix): VLM layers >= 1 compute and cache only the kept prefix entries and the
    action expert's layers >= 1 read only those; the actions equal the unpruned policy with the dropped entries masked
    out of exactly those layers (positions unchanged). vla_pruner: warm-up steps unpruned, then pruned with the
    action signal recorded from the expert's action queries; keep-all is bit-identical."""
    model, proc = _policy(text_layers=3)
    inputs = _inputs(proc)
    noise = fixed_noise(model, 2)
    ref_model = copy.deepcopy(model)
    unpruned = model.sample_actions(**inputs, noise=noise)
    extra = {"window": 1} if method == "vla_pruner" else {}
    vtprune.prune(model, method=method, keep=KEEP, layer=1, **extra)
    steps = 2 if method == "vla_pruner" else 1
    for step in range(steps):
        out = model.sample_actions(**inputs, noise=noise)
        rep = vtprune.last_report(model)
        if method == "vla_pruner" and step == 0:
            assert torch.equal(out, unpruned) and rep.details["vla_pruner"][0]["warmup"]
    assert [i.n_after for i in rep.images] == [KEEP] * 3 and not torch.equal(out, unpruned)
    keep = _kept_mask(rep, inputs["input_ids"].shape[1])
    handles = _per_layer_masked(ref_model, keep, 1)
    try:
        ref = ref_model.sample_actions(**inputs, noise=noise)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    vtprune.unprune(model)
    assert torch.equal(model.sample_actions(**inputs, noise=noise), unpruned)
    vtprune.prune(model, method=method, keep=T, layer=1, **extra)
    for _ in range(steps):
        assert torch.equal(model.sample_actions(**inputs, noise=noise), unpruned)


def test_vla_pruner_episodes_per_row_on_pi0():
    """A batch of two environments (two cameras, one camera) keeps one history per row: step by step through warm-up
    and pruning it equals each environment alone in an episode of its own; reset(rows=[0]) puts only row 0 back into
    warm-up."""
    model, proc = _policy(text_layers=3)
    vtprune.prune(model, method="vla_pruner", keep=KEEP, layer=1, window=1)
    both, noise = _inputs(proc, absent_first=False), fixed_noise(model, 2)
    with vtprune.episode(model):
        together = [model.sample_actions(**both, noise=noise) for _ in range(3)]
        vtprune.reset(model, rows=[0])
        model.sample_actions(**both, noise=noise)
        assert [d["warmup"] for d in vtprune.last_report(model).details["vla_pruner"]] == [True, True, False]
    for row in range(2):  # the row's own inputs (its slice of the batch) in an episode of its own
        with vtprune.episode(model):
            for step in range(3):
                out = model.sample_actions(**{k: v[row:row + 1] for k, v in both.items()}, noise=noise[row:row + 1])
                torch.testing.assert_close(out[0], together[step][row], rtol=0, atol=1e-5)
