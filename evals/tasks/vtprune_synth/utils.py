"""Document hooks of the vtprune_synth tasks (lmms-eval ``!function utils.<name>``); see make_data.py."""

from __future__ import annotations

import ast
from functools import partial
from typing import Any

from PIL import Image

from vtprune import synth as S
from vtprune.demo_models import parse_answer


def _visual(size: int, doc: dict) -> list[Image.Image]:
    # the picture evals/bench_accuracy.py gives the model: item `index` of the held-out split (seed 0) at `size` px
    return [S.item("heldout", int(doc["index"]), seed=0, size=size).image]


doc_to_visual_224 = partial(_visual, 224)
doc_to_visual_448 = partial(_visual, 448)


def _only(qtype: str, dataset: Any) -> Any:
    return dataset.filter(lambda d: d["qtype"] == qtype)


only_attribute = partial(_only, "attribute")
only_existence = partial(_only, "existence")
only_counting = partial(_only, "counting")
only_location = partial(_only, "location")
only_detail = partial(_only, "detail")


def doc_to_text(doc: dict) -> str:
    """The bare question, as the demo models were trained on it; the model's chat template adds the rest."""
    return doc["question"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The benchmark's scoring: first word, lower case, no punctuation, digits for number words."""
    return {"acc": float(parse_answer(results[0]) == doc["answer"])}


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
