"""The project's trained demo models, shipped inside the package (no download, works offline).

Two small vision-language models trained from scratch by ``evals/train_tiny.py`` on the synthetic visual-QA task
of ``vtprune/synth.py`` (coloured shapes on textured backgrounds; questions about colour, existence, count,
location and a small dot), built from the real transformers classes:

* ``"llava"``: ``LlavaForConditionalGeneration`` — CLIP-style ViT with [CLS] (224 px, patch 14 -> 256 visual
  tokens), 2-layer MLP projector, Llama language model.
* ``"qwen2_vl"``: ``Qwen2VLForConditionalGeneration`` — Qwen2-VL ViT (448 px, patch 14, 2x2 merge -> 256 visual
  tokens) and M-RoPE language model.

Usage::

    from vtprune.demo_models import demo_model, build_prompt, answer
    model, processor = demo_model("llava")
    print(answer(model, processor, [image], ["what colour is the circle?"]))   # e.g. ['red']

How each model was trained (device, time, steps, seed, versions, held-out accuracy) is in
``vtprune/assets/<name>/training.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODELS: tuple[str, ...] = ("llava", "qwen2_vl")

#: prompt of one question for each family (the format the models were trained on); the answer follows directly
#: (no leading space, so the first generated token already tells the answers of a question type apart)
PROMPTS: dict[str, str] = {
    "llava": "USER: <image>\n{q} ASSISTANT:",
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
}
#: image side in pixels each model was trained at (give it pictures of this size)
IMAGE_SIZE: dict[str, int] = {"llava": 224, "qwen2_vl": 448}
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def _check_name(name: Any) -> str:
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; valid names: {', '.join(repr(n) for n in DEMO_MODELS)}")
    return name


def model_dir(name: str = "llava") -> Path:
    """Directory holding the weights, config, tokenizer and processor files of demo model ``name``."""
    return ASSETS / _check_name(name)


def demo_model(name: str = "llava", path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` of the shipped demo model ``name`` ("llava" or "qwen2_vl"): float32, eval mode.

    Loads from the package directory only (``local_files_only``), so it works offline after ``pip install``.
    ``path``: load a model of the same family from another directory instead (e.g. a fresh ``train_tiny.py`` run).
    Raises ``ValueError`` naming the valid names for an unknown ``name``, and ``FileNotFoundError`` if the package
    was installed without its assets.
    """
    d = model_dir(name) if path is None else Path(path)
    if not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
        raise FileNotFoundError(f"demo model {name!r} is missing its files in {d} (model.safetensors, config.json); "
                                "the package was installed without vtprune/assets (check package-data)")
    if name == "llava":
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        model = LlavaForConditionalGeneration.from_pretrained(d, local_files_only=True, dtype=torch.float32)
        processor = LlavaProcessor.from_pretrained(d, local_files_only=True)
    else:
        from transformers import Qwen2VLForConditionalGeneration

        from .processors import processor_class

        model = Qwen2VLForConditionalGeneration.from_pretrained(d, local_files_only=True, dtype=torch.float32)
        # AutoProcessor would return only the tokenizer for this image-only subclass: load it explicitly
        processor = processor_class("Qwen2VLImageOnlyProcessor").from_pretrained(d, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


#: the shipped Meta-World policy (``evals/train_policy.py``): a tiny π0 trained here by behaviour cloning
POLICY = "pi0_metaworld"


def demo_policy(path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """``(policy, processor)`` of the shipped Meta-World policy: a ``PI0ForConditionalGeneration`` (float32, eval
    mode) that sees two cameras (``vtprune.metaworld.CAMERAS``) and the hand state, and its ``PI0Processor`` with the
    training data's state and action statistics. Run it closed loop with ``vtprune.metaworld.rollout``; its
    recipe, training time and held-out success are in ``training.json`` beside it. ``path``: another directory
    written by ``evals/train_policy.py``."""
    from transformers import PI0ForConditionalGeneration, PI0Processor

    d = ASSETS / POLICY if path is None else Path(path)
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"the demo policy is missing its files in {d}; train one with "
                                "evals/train_policy.py --out <dir> or reinstall the package with its assets")
    model = PI0ForConditionalGeneration.from_pretrained(d, local_files_only=True, dtype=torch.float32)
    processor = PI0Processor.from_pretrained(d, local_files_only=True)
    return model.eval(), processor


def training_record(name: str = "llava") -> dict:
    """The training record saved beside the weights (device, time, steps, seed, versions, accuracy)."""
    return json.loads((model_dir(name) / "training.json").read_text())


def family_of(model: torch.nn.Module) -> str:
    """"llava" or "qwen2_vl" from ``model.config.model_type``."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in PROMPTS:
        raise ValueError(f"model_type {mt!r} has no demo prompt; valid: {', '.join(PROMPTS)}")
    return mt


def build_prompt(family: str, question: str) -> str:
    """The one-question prompt the demo models of ``family`` were trained on."""
    if family not in PROMPTS:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(repr(f) for f in PROMPTS)}")
    return PROMPTS[family].format(q=question.strip())


def parse_answer(text: str) -> str:
    """A model's decoded output -> its single-word answer: first word, lower case, no punctuation, digits for
    number words ("Three." -> "3")."""
    words = text.replace("</s>", " ").replace("<|im_end|>", " ").strip().lower().split()
    if not words:
        return ""
    w = words[0].strip(".,!?;:'\"")
    return _NUMBER_WORDS.get(w, w)


@torch.no_grad()
def answer(model: torch.nn.Module, processor: Any, images: Sequence[Any], questions: Sequence[str],
           family: str | None = None, max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy single-word answers of ``model`` to ``questions`` about ``images`` (one image per question).

    Batched with left padding; works the same on a model pruned by :func:`vtprune.prune`.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions; give one image per question")
    family = family or family_of(model)
    eos = processor.tokenizer.eos_token_id
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        qs, ims = questions[i:i + batch_size], list(images[i:i + batch_size])
        inputs = processor(images=ims, text=[build_prompt(family, q) for q in qs], return_tensors="pt",
                           padding=True)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id)
        new = ids[:, inputs["input_ids"].shape[1]:]
        out += [parse_answer(t) for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out
