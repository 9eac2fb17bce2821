"""Per-family test inputs for the shared adapter tester: later families add an entry here."""

from __future__ import annotations

import functools

from vtprune.testing import tiny_image, tiny_llava

PROMPTS = ["USER: <image>\nwhat colour is it? ASSISTANT:",
           "USER: <image>\nhow many shapes are there in the picture? ASSISTANT:",
           "USER: <image>\nwhere? ASSISTANT:"]

# image sizes per sample: LLaVA-NeXT gets different aspect ratios so AnyRes grids differ inside one batch
SIZES = {"llava": [(60, 60), (60, 60), (60, 60)],
         "llava_next": [(100, 80), (60, 60), (60, 130)]}


@functools.cache
def _build(family: str):
    return tiny_llava(family)


def model_and_processor(family: str):
    import copy

    model, proc = _build(family)
    return copy.deepcopy(model), proc


def batch(family: str, idx: list[int]):
    """Processor output for samples ``idx`` (left-padded when several)."""
    _, proc = _build(family)
    images = [tiny_image(*SIZES[family][i], seed=i) for i in idx]
    return proc(images=images, text=[PROMPTS[i] for i in idx], return_tensors="pt", padding=True)


FAMILIES = list(SIZES)
