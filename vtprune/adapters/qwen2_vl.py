"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``) from transformers ≥ 5.

Positions (the part most pruners get wrong): the 3-D M-RoPE positions are computed by the model's own code on the
*unpruned* prompt, and the kept tokens keep their (t, h, w) columns; text keeps its positions. For ``generate`` the
model's own generate-time layout is used ([text row; t; h; w]) and the text row, which only feeds mask creation, is
re-laid on the pruned sequence. Positions always go to the model explicitly (generate extends them step by step;
a caller's own decode loop gets them from vtprune), so the model's cached ``rope_deltas`` is never read for a pruned
sequence and vtprune never writes it (it stays what the model's own code set).

Signal: the Qwen ViT has no [CLS]. ``fastervlm`` gets a documented substitute: the attention each patch *receives*
(mean over all queries of its image, head mean) in the last full-attention ViT block, summed over the 2×2 merge
window that becomes one LLM token; for Qwen2.5-VL the window-attention reorder is undone exactly as the model
undoes it for the features. This is not FasterVLM's signal, and the report says so.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..probes import global_importance, received_attention
from .base import Adapter, ImageTokens

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"qwen2_vl": "Qwen2VLAdapter", "qwen2_5_vl": "Qwen2VLAdapter"}

SIGNAL = ("received attention (mean over queries, head mean) of ViT block {k}, summed over each 2x2 merge window; "
          "a [CLS] substitute, not FasterVLM's [CLS] signal")


class Qwen2VLAdapter(Adapter):
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = "<|im_start|>user {img}{q}<|im_end|><|im_start|>assistant"
    provides = ("cls_attention", "vflow_importance", "grid")
    encoder_keys = ("pixel_values", "image_grid_thw")

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = self.inner_model(("visual", "get_rope_index"), "model.model",
                                     "Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration")

    def _score_block(self) -> int:
        full = getattr(self.model.config.vision_config, "fullatt_block_indexes", None)
        return int(full[-1]) if full else len(self.base.visual.blocks) - 1

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        grid = kwargs.get("image_grid_thw")
        if grid is None:
            raise ValueError("Qwen2-VL needs image_grid_thw (from the processor) alongside pixel_values")
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError("Qwen2-VL needs mm_token_type_ids (returned by the processor with input_ids) to lay out "
                             "3-D positions; pass the processor's whole output to the model")
        if bool((grid[:, 0] != 1).any()):
            raise ValueError(f"image_grid_thw has temporal size {grid[:, 0].tolist()}; vtprune prunes still images "
                             "(t = 1) only")
        merge = self.model.config.vision_config.spatial_merge_size
        pv = kwargs["pixel_values"]
        k = self._score_block()
        reducers = {name: fn for name, fn in (("cls_attention", received_attention),
                                              ("vflow_importance", global_importance)) if name in needs}
        with contextlib.ExitStack() as stack:
            caps = {name: stack.enter_context(self.capture(self.base.visual.blocks[k].attn, fn))
                    for name, fn in reducers.items()}
            out = self.base.get_image_features(pv, grid, return_dict=True)
        units = {}
        for name, cap in caps.items():
            # per-call results (one call per image on SDPA/eager, one packed call on flash) in processing order;
            # one LLM token = the 2x2 merge window of consecutive patches: scores add up
            patch = torch.cat([r.flatten() for r in self.captured(cap)])
            unit = patch.view(-1, merge * merge).sum(1)
            if hasattr(self.base.visual, "fullatt_block_indexes"):  # Qwen2.5-VL: undo the window reorder
                from transformers.vision_utils import get_vision_window_index

                vc = self.model.config.vision_config
                window_index, _ = get_vision_window_index(grid, spatial_merge_size=merge, window_size=vc.window_size,
                                                          patch_size=vc.patch_size)
                unit = unit[torch.argsort(window_index.to(unit.device))]
            units[name] = unit
        feats = list(out.pooler_output)
        extras = self.image_extras(out)
        images, start = [], 0
        for i, (f, (_, h, w)) in enumerate(zip(feats, grid.tolist())):
            im = ImageTokens(features=f, grid=(h // merge, w // merge), extras={k: v[i] for k, v in extras.items()})
            for name, unit in units.items():
                im.signals[name] = unit[start:start + f.shape[0]]
            if "cls_attention" in units:
                im.signal_source = SIGNAL.format(k=k)
            start += f.shape[0]
            images.append(im)
        return images

    def image_extras(self, out: Any) -> dict[str, list[torch.Tensor]]:
        """Per-token encoder outputs the model consumes besides the features (``ImageTokens.extras``): per name, one
        [n, ...] tensor per image. None for Qwen2-VL; Qwen3-VL's DeepStack features."""
        return {}

    def original_positions(self, kwargs: dict[str, Any], generate: bool) -> torch.Tensor:
        """[3, B, L] (forward) or [4, B, L] (generate: text row first) exactly as the unpruned model lays them out."""
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        enc = {k: kwargs.get(k) for k in ("attention_mask", "mm_token_type_ids", "image_grid_thw")}
        if generate:
            return self.model._prepare_position_ids_for_generation(kwargs["input_ids"], enc)
        pos, _ = self.base.get_rope_index(kwargs["input_ids"], **enc)
        return pos

    def finish(self, kwargs: dict[str, Any], new: dict[str, Any], generate: bool) -> None:
        pos, mask = new.get("position_ids"), new["attention_mask"]
        if pos is not None and pos.dim() == 2:  # caller gave 1-D positions: the model uses them on all three axes
            pos = pos[None].expand(3, -1, -1)
            new["position_ids"] = pos
        if pos is None:  # compact: the model's own layout on the pruned prompt cannot be computed (see module doc)
            pos = self._compact_positions(new)
            new["position_ids"] = pos
        if pos.shape[0] == 4:  # the text row feeds mask creation only: make it the pruned sequence's own
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            pos = torch.cat([text[None].to(pos), pos[1:]])
            new["position_ids"] = pos

    def _compact_positions(self, new: dict[str, Any]) -> torch.Tensor:
        """positions="compact" ablation: kept image tokens re-indexed like text (1-D positions on all 3 axes)."""
        mask = new["attention_mask"]
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return text[None].expand(3, -1, -1).clone()

    def next_position(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B]: decoding continues after the largest kept M-RoPE position (all three rotary axes; row 0 of
        generate's 4-row layout only feeds mask creation).

        Positions are given explicitly: in transformers 5.23 a Qwen2-VL decode step with a full 2-D mask and no
        position_ids fails even without vtprune (positions are built for the whole mask, not the new tokens).
        """
        return positions[-3:].masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
