"""Qwen3-VL (``qwen3_vl``) and Qwen3-VL-MoE (``qwen3_vl_moe``) from transformers ≥ 5: Qwen2-VL's layout (3-D
interleaved M-RoPE positions from the model's own code on the unpruned prompt, 2×2 merge, no [CLS], the same
received-attention substitute signal from the last ViT block, all of whose blocks attend fully) plus DeepStack.

DeepStack: features of intermediate ViT blocks, merged like the final ones (one per LLM token), are added to the
hidden states at the visual positions after the first decoder layers. They are per-token ``extras``: the shared
rewrite gathers them with the kept indices, so kept tokens get their own and dropped ones none (vflowopt's recycled
summaries carry their anchor token's: the selector merges the final features only). An ``llm:K`` stage that compacts
the sequence before the last addition gets the additions after layers ≥ K re-laid on its kept set.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from ..call import current
from .qwen2_vl import Qwen2VLAdapter

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"qwen3_vl": "Qwen3VLAdapter", "qwen3_vl_moe": "Qwen3VLAdapter"}

# The running language-model forward's DeepStack additions that an llm:K stage left to vtprune: (language model,
# visual_pos_masks [B, L], per-layer features). Per context, so threads sharing the model never see each other's.
_LATE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("vtprune_deepstack", default=None)


def _forget(*_: Any) -> None:  # after the language model's forward: hold no features past it
    _LATE.set(None)


class Qwen3VLAdapter(Qwen2VLAdapter):
    def image_extras(self, out: Any) -> dict[str, list[torch.Tensor]]:
        # per DeepStack layer a tuple of per-image [n, D] -> per image [n, layers, D] (token axis first)
        per_image = list(zip(*out.deepstack_features))
        return {"deepstack": [torch.stack(f, 1) for f in per_image]} if per_image else {}

    def package(self, features: list[torch.Tensor], extras: dict[str, list[torch.Tensor]]) -> Any:
        ds = extras.get("deepstack", [])
        layers = ds[0].shape[1] if ds else 0
        return BaseModelOutputWithDeepstackFeatures(pooler_output=features,
                                                    deepstack_features=[[d[:, j] for d in ds] for j in range(layers)])

    def llm_hooks(self, first: int) -> list[Any]:
        n = len(self.model.config.vision_config.deepstack_visual_indexes)
        if first >= n:  # every addition happens on the full sequence: the model's own code does them
            return []
        lm = self.model.model.language_model
        return [lm.register_forward_pre_hook(functools.partial(self._split, first), with_kwargs=True),
                lm.register_forward_hook(_forget, always_call=True),
                *(lm.layers[i].register_forward_hook(functools.partial(self._add, i)) for i in range(first, n))]

    def _split(self, first: int, lm: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The model adds the features of layers < first itself; later ones wait for ``_add`` (kept positions)."""
        c, ds = current(self), kwargs.get("deepstack_visual_embeds")
        if c is None or c.step is None or c.step.phase != "prefill" or not ds or len(ds) <= first:
            _LATE.set(None)
            return None
        _LATE.set((lm, kwargs["visual_pos_masks"], ds))
        return args, {**kwargs, "deepstack_visual_embeds": ds[:first]}

    def _add(self, i: int, layer: torch.nn.Module, args: tuple, hidden: torch.Tensor) -> torch.Tensor | None:
        late, run = _LATE.get(), getattr(current(self), "step", None)
        if late is None or run is None or late[0].layers[i] is not layer:
            return None
        _, mask, ds = late
        idx = run.cur.clamp(min=0)  # [B, L_cur]: full-prompt position of every row now in the sequence
        slot = (mask.flatten().long().cumsum(0) - 1).view_as(mask)  # feature row of every visual position
        vis = mask.gather(1, idx) & (run.cur >= 0)
        # as the model's own addition (_deepstack_process), on the rows kept so far
        hidden = hidden.clone()
        hidden[vis] = hidden[vis] + ds[i][slot.gather(1, idx)[vis]].to(hidden.device, hidden.dtype)
        return hidden
