"""Per-family test inputs for the shared adapter tester, built from the registry (see FAMILY below)."""

from __future__ import annotations

import copy
import functools

import torch

import vtprune
from vtprune.registry import get_adapter_class
from vtprune.testing import tiny_families, tiny_image

QUESTIONS = ["what colour is it?", "how many shapes are there in the picture?", "where?"]

# Every family vtprune supports, from the registry; each family's tiny builder and test image sizes from
# vtprune.testing, its placeholder and plain prompt layout from its adapter: a new family needs no edit here.
FAMILIES = vtprune.supported_models()
TINY = tiny_families()
MISSING = [f for f in FAMILIES if f not in TINY]  # tests/test_api.py fails naming them
FAMILIES = [f for f in FAMILIES if f in TINY]
FAMILY = {f: (TINY[f].build, get_adapter_class(f).placeholder, get_adapter_class(f).prompt, list(TINY[f].sizes))
          for f in FAMILIES}


@functools.cache
def _build(family: str, text_layers: int = 2, vision_layers: int = 2):
    return FAMILY[family][0](text_layers=text_layers, vision_layers=vision_layers)


def model_and_processor(family: str, text_layers: int = 2, vision_layers: int = 2):
    """A fresh copy of the family's tiny model (``text_layers`` decoder layers, ``vision_layers`` ViT layers) and
    its processor."""
    model, proc = _build(family, text_layers, vision_layers)
    return copy.deepcopy(model), proc


def prompt(family: str, question: str, n_images: int = 1) -> str:
    _, img, template, _ = FAMILY[family]
    return template.format(img=" ".join([img] * n_images), q=question)


def batch(family: str, idx: list[int]):
    """Processor output for samples ``idx`` (left-padded when several)."""
    _, proc = _build(family)
    sizes = FAMILY[family][3]
    images = [tiny_image(*sizes[i], seed=i) for i in idx]
    return proc(images=images, text=[prompt(family, QUESTIONS[i]) for i in idx], return_tensors="pt", padding=True)


def two_images(family: str):
    _, proc = _build(family)
    sizes = FAMILY[family][3]
    imgs = [tiny_image(*sizes[0], seed=1), tiny_image(*sizes[1], seed=2)]
    return proc(images=imgs, text=[prompt(family, "compare them", 2)], return_tensors="pt")


def is_qwen(family: str) -> bool:
    return family.startswith("qwen")


def forward_positions(family: str, model, inputs, mask=None):
    """Positions the unpruned model's forward gives this prompt (mask: which tokens count, default the inputs')."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"] if mask is None else mask
    if is_qwen(family):
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
        return pos
    return torch.arange(ids.shape[1]).expand_as(ids)


def batch_invariant_positions(family: str, model, inputs):
    """Positions that make the unpruned model's forward independent of left padding."""
    if is_qwen(family):
        return forward_positions(family, model, inputs)
    m = inputs["attention_mask"]
    return (m.cumsum(1) - 1).clamp(min=0)


def compact_positions(family: str, kept_mask):
    pos = (kept_mask.cumsum(1) - 1).clamp(min=0)
    return pos[None].expand(3, -1, -1) if is_qwen(family) else pos


def vision_impl(model) -> str:
    return model.config.vision_config._attn_implementation


def eager_vision_copy(model):
    """A copy of ``model`` whose vision tower runs eager attention (the reference for attention probes)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"vision_config": "eager"})
    return eager
