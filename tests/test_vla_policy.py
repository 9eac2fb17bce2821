"""VLA-Pruner on autoregressive action-token policies (SELECTORS.md §6.8; issue 16): a supported VLM whose
``generate`` emits N action tokens (discretised into bins on the last vocabulary ids, OpenVLA-style) is called once
per control step; the temporal state lives in an episode.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import vtprune
from tests.families import FAMILIES, batch, mixes_attention_types, model_and_processor
from tests.test_llm_stages import _reference, _stage_kept
from vtprune.episode import active
from vtprune.registry import get_adapter_class

# every VLM family whose language model runs in-LLM stages (Gemma 3 mixes attention types: refused, tested
# elsewhere); robot-policy classes without generate (pi0, `policy = True`) decode actions otherwise
POLICY_FAMILIES = [f for f in FAMILIES if not mixes_attention_types(f)
                   and not getattr(get_adapter_class(f), "policy", False)]
N_ACTIONS, BINS = 4, 16


def _policy(family: str = "llava", **options):
    model, _ = model_and_processor(family, text_layers=3, vision_layers=3)
    vtprune.prune(model, method="vla_pruner", keep=5, layer=1, window=2, **options)
    return model


def _step(model, inputs, **kw):
    """One control step: N action tokens, each one of the last BINS vocabulary ids (the action bins)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return model.generate(**inputs, max_new_tokens=N_ACTIONS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, bad_words_ids=[[i] for i in range(vocab - BINS)], **kw)


def _details(model) -> list[dict]:
    return vtprune.last_report(model).details["vla_pruner"]


@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_warm_up_then_pruned_steps_match_the_layer_loop(family):
    """The first `window` steps run unpruned (and record); the next keeps exactly `keep` tokens per image, drawn from
    C_vl ∪ C_act, and its first action's logits equal a test-side layer loop that drops the same tokens from layer
    K on (positions preserved)."""
    model = _policy(family)
    inputs = batch(family, [0])
    for step in range(3):
        out = _step(model, inputs)
        rep = vtprune.last_report(model)
        warm = step < 2
        assert [d["warmup"] for d in _details(model)] == [warm]
        assert all((i.n_after == i.n_before) == warm for i in rep.images if i.stage == "llm:1")
    assert [i.n_after for i in rep.images] == [5]
    d = _details(model)[0]
    assert d["semantic_only"] + d["action_only"] + d["both"] == 5
    kept = _stage_kept(model, inputs, rep)
    ref = _reference(model, inputs, kept)
    torch.testing.assert_close(out.logits[0][0], ref[0, -1], rtol=0, atol=1e-4)


def test_keep_all_is_bit_identical_to_the_unpruned_policy():
    model, _ = model_and_processor("llava", text_layers=3, vision_layers=3)
    inputs = batch("llava", [0, 1])
    ref = [_step(model, inputs) for _ in range(4)]
    vtprune.prune(model, method="vla_pruner", keep=100_000, layer=1, window=2)
    for r in ref:
        out = _step(model, inputs)
        assert torch.equal(out.sequences, r.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, r.logits))


def test_a_batch_of_episodes_equals_each_alone():
    """B vectorised environments keep B independent histories: a batch of two equals each run in an episode of
    its own, step by step, through warm-up and pruning."""
    model = _policy()
    both = batch("llava", [0, 1])
    seqs = [_step(model, both).sequences for _ in range(4)]
    for row in range(2):
        alone = batch("llava", [row])
        with vtprune.episode(model):
            for step in range(4):
                out = _step(model, alone).sequences
                n = alone["input_ids"].shape[1]
                assert torch.equal(out[0, n:], seqs[step][row, -N_ACTIONS:]), (row, step)


def test_reset_rows_and_episode_blocks():
    model = _policy()
    inputs = batch("llava", [0, 1])
    for _ in range(2):
        _step(model, inputs)
    _step(model, inputs)
    assert [d["warmup"] for d in _details(model)] == [False, False]
    vtprune.reset(model, rows=[1])  # environment 1 started a new episode; environment 0 goes on
    _step(model, inputs)
    assert [d["warmup"] for d in _details(model)] == [False, True]
    with vtprune.episode(model):  # a fresh history inside the block
        _step(model, inputs)
        assert [d["warmup"] for d in _details(model)] == [True, True]
    _step(model, inputs)  # the thread's episode is as the block found it (row 1 had one step, now two)
    assert [d["warmup"] for d in _details(model)] == [False, True]
    _step(model, inputs)
    assert [d["warmup"] for d in _details(model)] == [False, False]
    vtprune.reset(model)
    _step(model, inputs)
    assert [d["warmup"] for d in _details(model)] == [True, True]
    with pytest.raises(ValueError, match="rows must be a list"):
        vtprune.reset(model, rows=[-1])


def test_recorded_action_attention_is_the_action_tokens_attention_over_the_image():
    """A warm-up step records the action tokens' head-mean attention over the image slots at record_layer,
    averaged over the action tokens — re-derived from the eager attention maps of the same generate."""
    model = _policy(record_layer=2)
    inputs = batch("llava", [0])
    eager = copy.deepcopy(model)
    vtprune.unprune(eager)
    eager.set_attn_implementation({"text_config": "eager"})
    with vtprune.episode(model) as m:
        _step(m, inputs)
        hist = active(model._vtprune_state.adapter, None).history(0, 0, 2)
    ref = _step(eager, inputs, output_attentions=True)
    img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    # attentions[t][layer]: [B, H, q, kv]; steps 1..N-1 are the decode steps, whose query is an action token (the
    # last action token is never fed back), as in the reference's average over its decode steps
    rows = [ref.attentions[t][2][0, :, -1] for t in range(1, N_ACTIONS)]
    expect = torch.stack([r.mean(0)[img] for r in rows]).mean(0)
    assert len(hist) == 1
    torch.testing.assert_close(hist[0], expect, rtol=0, atol=1e-5)


def test_plain_calls_cache_gradients_copies_threads():
    """Gradients on, no cache (same tokens as with it, step by step), a deepcopy with its own episodes, and two
    threads each in its own episode block give what one thread alone gives."""
    model = _policy()
    assert torch.is_grad_enabled()
    inputs = batch("llava", [0, 1])
    with vtprune.episode(model):
        cached = [_step(model, inputs).sequences for _ in range(3)]
    with vtprune.episode(model):
        plain = [_step(model, inputs, use_cache=False).sequences for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))
    twin = copy.deepcopy(model)
    assert [d["warmup"] for d in (_step(twin, inputs), _details(twin))[1]] == [True, True]  # its own history
    results: dict = {}

    def work(t: int) -> None:
        with vtprune.episode(model):
            results[t] = [_step(model, inputs).sequences for _ in range(3)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for t in range(2) for a, b in zip(results[t], cached))


def test_bad_use_gets_a_clear_error():
    model = _policy()
    inputs = batch("llava", [0])
    with pytest.raises(ValueError, match="call model.generate"):
        model(**inputs)
    model, _ = model_and_processor("llava", text_layers=3, vision_layers=3)
    with pytest.raises(ValueError, match="record_layer=7 is outside"):
        vtprune.prune(model, method="vla_pruner", keep=5, layer=1, record_layer=7)
    with pytest.raises(ValueError, match="window"):
        vtprune.prune(model, method="vla_pruner", keep=5, layer=1, window=0)
    assert not vtprune.is_pruned(model)
    with pytest.raises(ValueError, match="not pruned"):
        vtprune.reset(model)
