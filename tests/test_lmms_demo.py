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
