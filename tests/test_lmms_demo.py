"""The shipped demo models under lmms-eval: their processors' chat templates render the trained prompt, and the
held-out synthetic task through lmms-eval answers exactly as ``evals/bench_accuracy.py`` does."""

from __future__ import annotations

import pytest

from vtprune.demo_models import DEMO_MODELS, build_prompt, demo_model

QUESTIONS = ("what colour is the circle?", "  is there a red star? ", "how many shapes are there?")


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_chat_template_renders_the_trained_prompt(name):
    """lmms-eval's classes hand the processor (chat ``llava_hf``, ``qwen2_5_vl``: a content list with an image item)
    or the tokenizer (simple ``llava_hf``: a string with the placeholder already in it) a user turn, sometimes after a
    system turn; every form must give ``build_prompt``'s string, which is what the model was trained on."""
    from transformers import AutoTokenizer

    from vtprune.demo_models import PROMPTS, model_dir

    _, proc = demo_model(name)
    tok = AutoTokenizer.from_pretrained(model_dir(name))  # what lmms-eval's simple llava_hf loads
    placeholder = PROMPTS[name].split("{q}")[0].split("\n", 1)[1] if name == "qwen2_vl" else "<image>\n"
    for q in QUESTIONS:
        want = build_prompt(name, q)
        content = [{"type": "image"}, {"type": "text", "text": q}]
        system = {"role": "system", "content": "You are a helpful assistant."}
        for msgs in ([{"role": "user", "content": content}], [system, {"role": "user", "content": content}]):
            assert proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
        as_string = [{"role": "user", "content": placeholder + q.strip()}]
        assert tok.apply_chat_template(as_string, tokenize=False, add_generation_prompt=True) == want
        # a scored continuation (lmms-eval's log-likelihood path): the answer right after the prompt, then the end of
        # sequence, as in training
        full = tok.apply_chat_template([*as_string, {"role": "assistant", "content": "red"}], tokenize=False)
        assert full == want + "red" + tok.eos_token


# ---- the held-out task through lmms-eval == evals/bench_accuracy.py --------------------------------------------------
PER_TYPE = 2  # items per question type: held-out items 0 .. 9 (types cycle with the index)


def _bench(name: str, method: str, ratio: float) -> tuple[list[str], float]:
    """bench_accuracy's answers to the first 5 * PER_TYPE held-out items and their accuracy, with its own harness."""
    import sys
    from pathlib import Path

    import vtprune

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
    import bench_accuracy

    h = bench_accuracy.Harness(name, 5 * PER_TYPE)
    if method != "none":
        vtprune.prune(h.model, **bench_accuracy.prune_kwargs(method, ratio, "preserve"))
    preds, _ = h.predict()
    return preds, sum(p == it.qa.answer for p, it in zip(preds, h.items)) / len(preds)


@pytest.mark.parametrize("name,size,model_args", [
    ("llava", 224, "pretrained=vtprune:llava,method=divprune,keep=28"),  # default base: lmms-eval's own llava_hf
    ("qwen2_vl", 448, "pretrained=vtprune:qwen2_vl,method=divprune,keep=28,batch_size=2"),  # default: vtprune_hf
])
def test_synth_task_through_lmms_eval_equals_bench_accuracy(name, size, model_args, monkeypatch, tmp_path):
    """``lmms_eval --model vtprune --model_args pretrained=vtprune:<demo>,method=divprune,keep=28`` on the bundled
    held-out task gives bench_accuracy's answers item by item at its divprune 0.11 point (28 of 256 tokens), hence
    its accuracy."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is the optional `eval` extra: pip install -e '.[eval]'")
    from pathlib import Path

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vtprune.demo_models import parse_answer
    from vtprune.synth import QUESTION_TYPES

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    tasks = [f"vtprune_synth{size}_{t}" for t in QUESTION_TYPES]
    res = simple_evaluate(model="vtprune", model_args=model_args, tasks=tasks, limit=PER_TYPE, log_samples=True,
                          task_manager=TaskManager(include_path=str(Path(__file__).resolve().parents[1] / "evals" /
                                                                    "tasks")))
    got = {s["doc"]["index"]: parse_answer(s["filtered_resps"][0]) for t in tasks for s in res["samples"][t]}
    want, acc = _bench(name, "divprune", 0.11)
    assert [got[i] for i in range(5 * PER_TYPE)] == want
    assert sum(res["results"][t]["acc,none"] for t in tasks) / len(tasks) == pytest.approx(acc)
    assert res["throughput"]["avg_vtprune_visual_tokens_after"] == 28
