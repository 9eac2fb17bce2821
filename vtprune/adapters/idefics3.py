"""Idefics3 (``idefics3``) and SmolVLM (``smolvlm``), transformers ≥ 5: one model code, one adapter.

An image is split into tiles (a rows × cols grid of crops) plus a global image (only the global image when it is not
split); every tile goes through the SigLIP-style tower on its own and the connector's pixel shuffle folds each
s × s patch block (``scale_factor`` s) into one LLM token. In the prompt each tile is its own run of ``<image>``
tokens behind a text marker (``<fake_token_around_image><row_i_col_j>``, the global image's ``<global-img>``), and
markers are text: never pruned, always in place. The model itself does not know which runs make one image, so
``image_index`` reads it from the prompt: an image is its tile runs up to and including its global run, which always
comes last. The global marker's id is not in the model config, so it is read from the prompt too: the last run of
a prompt with images is always a global run. Budgets are per image, over all its tiles.

Signal: the tower has no [CLS]. ``fastervlm`` / ``holov`` get a documented substitute: the attention each patch
*receives* (mean over the queries of its tile, head mean) in the last ViT layer (the one feeding the connector),
summed over its pixel-shuffle block; ``vflowopt``'s importance is summed the same way. The blocks are read by running
the model's own ``pixel_shuffle`` on patch indices, so they cannot drift from the features. Tiles are holov's crops.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..probes import global_importance, received_attention
from .base import Adapter, ImageTokens

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"idefics3": "Idefics3Adapter", "smolvlm": "SmolVLMAdapter"}

SIGNAL = ("received attention (mean over its tile's queries, head mean) of the last ViT layer, summed over each "
          "pixel-shuffle block; a [CLS] substitute, not FasterVLM's [CLS] signal")


class Idefics3Adapter(Adapter):
    prompt = "User:{img}{q}<end_of_utterance>\nAssistant:"
    provides = ("cls_attention", "vflow_importance", "grid", "crop_ids")
    encoder_keys = ("pixel_values", "pixel_attention_mask")

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = self.inner_model(("vision_model", "connector", "text_model"), "model.model",
                                     "Idefics3ForConditionalGeneration and SmolVLMForConditionalGeneration")

    def pad_token_id(self) -> int:
        # the id the model pads with (Idefics3Model.padding_idx); the top-level config's defaults to 128002, which is
        # outside SmolVLM's vocabulary
        pid = self.text_config().pad_token_id
        return int(pid) if pid is not None and pid != self.image_token_id() else super().pad_token_id()

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.base.text_model.layers

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_img = input_ids == self.image_token_id()
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # the marker of every position's run: the last text token at or before it
        marker = input_ids.gather(1, torch.where(is_img, -1, pos).cummax(1).values.clamp(min=0))
        last = torch.where(is_img, pos, -1).amax(1, keepdim=True).clamp(min=0)
        in_global = is_img & (marker == marker.gather(1, last))
        starts = in_global & ~torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
        # an image's tile runs come before its global run: count the global runs started before, or up to, p
        return (starts.long().cumsum(1) - in_global.long()).masked_fill(~is_img, -1)

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        attn = self.base.vision_model.encoder.layers[-1].self_attn  # the layer feeding the connector
        reducers = {name: fn for name, fn in (("cls_attention", received_attention),
                                              ("vflow_importance", global_importance)) if name in needs}
        with contextlib.ExitStack() as stack:
            caps = {name: stack.enter_context(self.capture(attn, fn)) for name, fn in reducers.items()}
            out = self.base.get_image_features(kwargs["pixel_values"], kwargs.get("pixel_attention_mask"),
                                               return_dict=True)
        feats = torch.cat(list(out.pooler_output))  # every real tile's tokens (all-zero padding tiles dropped)
        per_tile = out.last_hidden_state.shape[1] // self.model.config.scale_factor ** 2
        img = self.image_index(kwargs["input_ids"])
        counts = [int(c) for row in img for c in torch.bincount(row[row >= 0]).tolist()]
        if sum(counts) != feats.shape[0] or any(c % per_tile for c in counts):
            raise ValueError(f"the prompts' image runs hold {sum(counts)} tokens ({counts} per image) but the images "
                             f"give {feats.shape[0]} ({per_tile} per tile); pass the processor's own input_ids and "
                             "pixel_values")
        groups = self._shuffle_groups(out.last_hidden_state.shape[1]).to(feats.device)  # [tokens per tile, s*s]
        scores = {name: torch.cat(self.captured(cap))[:, groups].sum(-1).flatten() for name, cap in caps.items()}
        side = int(round(per_tile ** 0.5))
        images, start = [], 0
        for n in counts:
            tiles = n // per_tile
            im = ImageTokens(features=feats[start:start + n], grid=[(side, side)] * tiles,
                             signals={name: s[start:start + n] for name, s in scores.items()},
                             signal_source=SIGNAL if "cls_attention" in scores else "")
            if tiles > 1:  # tiles and the global image are a holistic budget's crops
                im.signals["crop_ids"] = torch.arange(tiles, device=feats.device).repeat_interleave(per_tile)
            images.append(im)
            start += n
        return images

    def _shuffle_groups(self, n_patches: int) -> torch.Tensor:
        """LongTensor[tokens per tile, s*s]: the patches each LLM token is folded from, by the model's own shuffle."""
        idx = torch.arange(n_patches, dtype=torch.float32).view(1, n_patches, 1)
        out = self.base.connector.pixel_shuffle(idx, self.model.config.scale_factor)
        return out[0].round().long()


class SmolVLMAdapter(Idefics3Adapter):
    prompt = "<|im_start|>User:{img}{q}<end_of_utterance>\nAssistant:"
