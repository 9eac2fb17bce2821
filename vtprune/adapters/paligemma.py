"""PaliGemma (``paligemma``) and Gemma 3 (``gemma3``) from transformers ≥ 5: a SigLIP tower, a projector, a Gemma
decoder whose image tokens (PaliGemma: and the whole text prefix) attend bidirectionally.

The prefix-LM mask is the model's own: it is built from ``token_type_ids`` (PaliGemma: 0 = image + prefix,
bidirectional, 1 = causal suffix; Gemma 3: 1 = image token, bidirectional within its run), which the rewrite gathers
with the kept tokens, so kept image tokens and the prefix see each other exactly as before and the suffix stays
causal. PaliGemma positions are 1-based in forward (generate adds the 1 itself); Gemma 3's are the usual ones.

Signal: SigLIP has no [CLS]. ``fastervlm`` / ``holov`` get a documented substitute, the attention each patch
*receives* (mean over the image's queries, head mean) in the last SigLIP layer, which feeds the projector;
``vflowopt`` its attention from the image's "global" tokens there. Gemma 3 average-pools k×k patches into one token:
the scores of a token's patches add up. The report's ``signal`` says so.

Gemma 3 specifics: pan-and-scan crops (off by default in the processor) are separate images to the model (one
placeholder run, one row of ``pixel_values``, one bidirectional block each), so each gets its own budget. Sliding
window layers count the tokens the language model receives: after pruning a window reaches further back in the
original prompt, as it does in the cache while decoding. In-LLM stages refuse language models that mix attention
types (``llm.LLMStages.attach``), so ``fastv`` / ``pdrop`` / ``atp`` / ``flowcut`` raise at ``prune()``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..call import current
from ..probes import global_importance, received_attention
from .base import Adapter, ImageTokens

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"paligemma": "PaliGemmaAdapter", "gemma3": "Gemma3Adapter"}

SIGNAL = ("received attention (mean over the image's queries, head mean) of the last SigLIP layer{pool}; a [CLS] "
          "substitute, not FasterVLM's [CLS] signal")


class SiglipGemmaAdapter(Adapter):
    """What PaliGemma and Gemma 3 share: the SigLIP tower and its substitute signals, one feature tensor."""

    provides = ("cls_attention", "vflow_importance", "grid")
    encoder_keys = ("pixel_values",)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = self.inner_model(("vision_tower", "multi_modal_projector", "get_image_features"), "model.model",
                                     "PaliGemmaForConditionalGeneration and Gemma3ForConditionalGeneration")

    def pool(self) -> int:
        """Patches per side averaged into one LLM token (PaliGemma: every patch is a token)."""
        return 1

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        attn = self.tower_layers()[-1].self_attn  # its output (post-norm) is what the projector reads
        reducers = {name: fn for name, fn in (("cls_attention", received_attention),
                                              ("vflow_importance", global_importance)) if name in needs}
        with contextlib.ExitStack() as stack:
            caps = {name: stack.enter_context(self.capture(attn, fn)) for name, fn in reducers.items()}
            feats = self.base.get_image_features(kwargs["pixel_values"], return_dict=True).pooler_output
        k = self.pool()
        side = int(round(feats.shape[1] ** 0.5))  # LLM tokens per side
        rows = {name: torch.cat(self.captured(cap)).view(-1, side, k, side, k).sum((2, 4)).flatten(1)
                for name, cap in caps.items()}
        src = SIGNAL.format(pool=f", summed over each {k}x{k} pooling window" if k > 1 else "")
        return [ImageTokens(features=f, grid=(side, side), signals={n: r[i] for n, r in rows.items()},
                            signal_source=src if "cls_attention" in rows else "") for i, f in enumerate(feats)]

    def package(self, features: list[torch.Tensor], extras: dict[str, list[torch.Tensor]]) -> Any:
        # the model takes one tensor (it only checks the element count), not a list per image
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])


class PaliGemmaAdapter(SiglipGemmaAdapter):
    placeholder = "<image>"
    prompt = "{img}{q}"  # the processor puts <bos> after the image tokens and "\n" at the end

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The processor puts several images back to back in one run: a run of a multiple of the model's fixed
        tokens per image is that many images (a run of any other length is one image)."""
        n = self.model.config.text_config.num_image_tokens
        out = torch.full_like(input_ids, -1)
        for b, row in enumerate(input_ids == self.image_token_id()):
            pos, img = row.nonzero().flatten(), 0
            for run in pos.tensor_split(((pos.diff() > 1).nonzero().flatten() + 1).tolist()):
                per = n if run.numel() % n == 0 else max(run.numel(), 1)
                out[b, run] = img + torch.arange(run.numel(), device=run.device) // per
                img += run.numel() // per
        return out

    def original_positions(self, kwargs: dict[str, Any], generate: bool) -> torch.Tensor:
        pos = super().original_positions(kwargs, generate)
        # forward counts from 1; generate's own positions count from 0 and prepare_inputs_for_generation adds the 1
        return pos + 1 if kwargs.get("position_ids") is None and not generate else pos

    def session_info(self, kwargs: dict[str, Any], new: dict[str, Any], config: Any) -> dict[str, Any] | None:
        info = super().session_info(kwargs, new, config)
        if info is not None:  # a forward's positions are the LM's own, generate's are 1 less: a call of the other
            info["generate_positions"] = current(self).kind == "generate"  # kind continuing the cache converts
        return info

    def decode_call(self, kwargs: dict[str, Any], info: dict[str, Any], cached: int) -> dict[str, Any] | None:
        new = super().decode_call(kwargs, info, cached)
        if new is not None and kwargs.get("position_ids") is None and new.get("position_ids") is not None \
                and info["generate_positions"]:
            new["position_ids"] = new["position_ids"] + 1
        return new

    def continue_call(self, kwargs: dict[str, Any], info: dict[str, Any], cached: int) -> dict[str, Any]:
        new = super().continue_call(kwargs, info, cached)
        if new.get("position_ids") is not None and not info["generate_positions"]:
            new["position_ids"] = new["position_ids"] - 1  # generate adds the 1 again
        return new


class Gemma3Adapter(SiglipGemmaAdapter):
    placeholder = "<start_of_image>"  # the processor expands it to \n\n<start_of_image> tokens <end_of_image>\n\n
    prompt = "<start_of_turn>user\n{img}{q}<end_of_turn>\n<start_of_turn>model\n"

    def pool(self) -> int:
        return self.base.multi_modal_projector.kernel_size
