"""Per-family test inputs for the shared adapter tester, built from the registry (see FAMILY below)."""

from __future__ import annotations

import contextlib
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
# Robot policies (an adapter with ``policy = True``, e.g. π0) run ``sample_actions`` / ``forward(actions=...)``, not
# the text-generation calls of the shared matrix: they have their own contract tests (tests/test_<family>.py).
POLICIES = [f for f in FAMILIES if f in TINY and getattr(get_adapter_class(f), "policy", False)]
FAMILIES = [f for f in FAMILIES if f in TINY and f not in POLICIES]
FAMILY = {f: (TINY[f].build, get_adapter_class(f).placeholder, get_adapter_class(f).prompt, list(TINY[f].sizes))
          for f in FAMILIES}


@functools.cache
def _build(family: str, text_layers: int = 2, vision_layers: int = 2):
    return FAMILY[family][0](text_layers=text_layers, vision_layers=vision_layers)


@functools.cache
def mixes_attention_types(family: str) -> bool:
    """The family's tiny language model mixes attention types (Gemma 3: sliding-window and full layers): in-LLM stages
    refuse such a model at prune() (tests/test_llm_stages.py checks the refusal), pre_llm stages run."""
    return len(set(getattr(_build(family)[0].config.get_text_config(), "layer_types", None) or ())) > 1


def in_llm(family: str, method: str) -> bool:
    """``prune(model, method=...)`` puts a stage inside the language model on this family: the method has no pre_llm
    form, and no vision-stage form the family's tower runs."""
    spec = vtprune.registry.get_selector(method)
    if "pre_llm" in spec.stages:
        return False
    return not ("vision" in spec.stages and get_adapter_class(family)(_build(family)[0]).vision_stage)


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
    return _inputs(proc(images=images, text=[prompt(family, QUESTIONS[i]) for i in idx], return_tensors="pt",
                        padding=True))


def _inputs(out):
    # PaliGemma's processor also returns training labels (kept for backward compatibility; all -100 without a
    # suffix): tests pass labels themselves where they mean to
    out.pop("labels", None)
    return out


def two_images(family: str):
    _, proc = _build(family)
    sizes = FAMILY[family][3]
    imgs = [tiny_image(*sizes[0], seed=1), tiny_image(*sizes[1], seed=2)]
    return _inputs(proc(images=imgs, text=[prompt(family, "compare them", 2)], return_tensors="pt"))


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
    return torch.arange(ids.shape[1]).expand_as(ids) + position_offset(model)


def _layer_inputs(model, **call) -> list[dict]:
    """The keyword arguments each decoder layer of the unpruned model receives in ``model(**call)``."""
    seen: list[dict] = []
    layers = get_adapter_class(model.config.model_type)(model).decoder_layers()
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True) for layer in layers]
    try:
        with vtprune.disabled(model) if vtprune.is_pruned(model) else contextlib.nullcontext(), torch.no_grad():
            model(**call)
    finally:
        for h in hooks:
            h.remove()
    return seen


def position_offset(model) -> int:
    """The position id the unpruned model's forward gives the first token (PaliGemma counts from 1), read from what its
    decoder layers receive for a one-token text prompt."""
    pos = _layer_inputs(model, input_ids=torch.ones(1, 1, dtype=torch.long))[0].get("position_ids")
    return int(pos.flatten()[0]) if pos is not None else 0


def generated(model, inputs, n: int = 1) -> dict:
    """``inputs`` with ``attention_mask`` and the per-token type ids extended by ``n`` tokens after the prompt, one at a
    time by the model's own generate rule (PaliGemma: type 1, the causal suffix; the others: text)."""
    kw = {k: inputs[k] for k in ("attention_mask", "token_type_ids", "mm_token_type_ids") if k in inputs}
    for _ in range(n):
        kw = model._update_model_kwargs_for_generation({}, kw, num_new_tokens=1)
    return {**inputs, **kw}


def reference_mask(model, inputs, mask):
    """``attention_mask`` for the reference run of the unpruned model on the full sequence with the dropped tokens
    masked (``mask`` 2-D, dropped tokens 0), so that it attends as the pruned model does over its kept tokens.

    That is ``mask`` itself, except in a language model with sliding-window layers: their window counts the tokens the
    model receives (it is taken over the sequence index, and the sliding cache keeps the last ones), so after pruning
    it reaches further back. There: the model's own masks for ``mask`` as a {layer type: mask} mapping, the sliding
    layers' being the full-attention mask limited to keys fewer than ``sliding_window`` kept tokens back."""
    tc = model.config.get_text_config()
    types = list(getattr(tc, "layer_types", None) or [])
    if "sliding_attention" not in types:
        return mask
    full = _layer_inputs(model, **{**inputs, "attention_mask": mask})[types.index("full_attention")]["attention_mask"]
    allowed = full if full.dtype == torch.bool else full == 0
    rank = mask.long().cumsum(1)
    near = (rank[:, :, None] - rank[:, None, :] < tc.sliding_window)[:, None]
    sliding = allowed & near if full.dtype == torch.bool else full.masked_fill(~near, torch.finfo(full.dtype).min)
    return {"full_attention": full, "sliding_attention": sliding}


def batch_invariant_positions(family: str, model, inputs):
    """Positions that make the unpruned model's forward independent of left padding."""
    if is_qwen(family):
        return forward_positions(family, model, inputs)
    m = inputs["attention_mask"]
    return (m.cumsum(1) - 1).clamp(min=0)


def compact_positions(family: str, kept_mask, model=None):
    """Positions counting only the kept tokens (from the model's own first position, when ``model`` is given)."""
    pos = (kept_mask.cumsum(1) - 1).clamp(min=0) + (position_offset(model) if model is not None else 0)
    return pos[None].expand(3, -1, -1) if is_qwen(family) else pos


def vision_impl(model) -> str:
    return model.config.vision_config._attn_implementation


def eager_vision_copy(model):
    """A copy of ``model`` whose vision tower runs eager attention (the reference for attention probes)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"vision_config": "eager"})
    return eager


def grid_positions_by_hand(ids: torch.Tensor, image_token_id: int, h: int, w: int) -> tuple[torch.Tensor, int, int]:
    """M-RoPE positions [3, L] of a one-image Qwen prompt ``ids`` [L] worked out by hand from its h × w token grid:
    text 0..first-1; image token j at (first, first + j // w, first + j % w); text resumes at first + max(h, w).
    Returns (positions, first image position, image tokens)."""
    first = int((ids == image_token_id).nonzero()[0])
    n_img = h * w
    expect = torch.zeros(3, ids.numel(), dtype=torch.long)
    expect[:, :first] = torch.arange(first)
    j = torch.arange(n_img)
    expect[0, first:first + n_img] = first
    expect[1, first:first + n_img] = first + j // w
    expect[2, first:first + n_img] = first + j % w
    expect[:, first + n_img:] = first + max(h, w) + torch.arange(ids.numel() - first - n_img)
    return expect, first, n_img


def lm_call(model, inputs) -> tuple[dict, torch.Tensor]:
    """(the keyword arguments the language model receives, logits) of one ``model(**inputs)`` under no_grad."""
    seen: dict = {}
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        h.remove()
    return seen, logits
