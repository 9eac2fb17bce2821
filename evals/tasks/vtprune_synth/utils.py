"""Document hooks of the vtprune_synth tasks (lmms-eval ``!function utils.<name>``).

Images are opened relative to this file, so the task works from any working directory and without network.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
PROMPT_SUFFIX = " Answer with one word."


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The row's picture as a list of RGB PIL images (lmms-eval's simple-model contract)."""
    with Image.open(HERE / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc: dict) -> str:
    """The question; the model adds the image placeholder and its own prompt template."""
    return doc["question"] + PROMPT_SUFFIX


def doc_to_choice(doc: dict) -> list[str]:
    """Four candidate answers for the multiple-choice (log-likelihood) variant."""
    return list(doc["choices"])


def _first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the first word of the generated answer (case and punctuation ignored)."""
    return {"acc": float(_first_word(results[0]) == doc["answer"])}


def _loss(resp: object) -> float:
    # lmms-eval 0.7.3 passes every response through unwrap_generation_output, which turns a model's
    # (loss, is_greedy) tuple into its str(); its built-in multiple-choice scoring then fails to unpack it.
    if isinstance(resp, str):
        resp = ast.literal_eval(resp)
    loss, _greedy = resp  # type: ignore[misc]
    return float(loss)


def process_results_mc(doc: dict, results: list) -> dict[str, float]:
    """Multiple choice: the choice with the lowest loss (lmms-eval's convention: models return the continuation's
    mean negative log-likelihood, lower is more likely) must be the answer."""
    losses = [_loss(r) for r in results]
    pred = min(range(len(losses)), key=losses.__getitem__)
    return {"acc": float(pred == doc["answer_idx"])}
