"""InternVL 2/2.5/3, the transformers-native ``internvl`` family (≥ 5).

An image is one or more 448-px tiles (dynamic crops + thumbnail); each tile gives the same number of LLM tokens
after InternViT drops [CLS] and a 0.5 pixel-shuffle folds every 2×2 patch block into one token. The model itself
does not know which tiles belong to which image, so the adapter reads it from the prompt: every image is one
placeholder run in ``input_ids`` of (tiles × tokens per tile) tokens.

Signal: InternViT has a [CLS] token. Its attention row in the layer that feeds the projector is captured by the
vision probe; each LLM token scores the **sum** of the [CLS] attention of its four source patches. The 2×2 grouping
is read by running the model's own ``pixel_shuffle`` on patch indices, so it cannot drift from the features.

FlowCut runs inside InternViT (``encode_vision``): the pixel shuffle needs the whole patch grid, so FlowCut drops
whole 2×2 blocks (each the source of one LLM token, scored by the sum of its patches) and the last layer's output is
scattered back onto the full grid (zeros where dropped) before the shuffle; only the kept blocks' tokens are used.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..probes import cls_row, global_importance
from .base import Adapter, ImageTokens, flowcut_in_tower

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"internvl": "InternVLAdapter"}


class InternVLAdapter(Adapter):
    placeholder = "<IMG_CONTEXT>"
    prompt = "user: {img}\n{q} assistant:"
    provides = ("cls_attention", "vflow_importance", "flow_stats", "grid", "crop_ids")
    encoder_keys = ("pixel_values",)

    @property
    def vision_stage(self) -> bool:  # type: ignore[override]
        """In-encoder FlowCut needs the last layer's features with [CLS] first (the defaults); a checkpoint configured
        otherwise gets FlowCut's LLM-stage variant instead, and the report's stage says so."""
        return self._reads_last_layer(self._feature_args({}))

    def _feature_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's vision_feature_layer / vision_feature_select_strategy, else the config's."""
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        return {"vision_feature_layer": cfg.vision_feature_layer if layer is None else layer,
                "vision_feature_select_strategy": kwargs.get("vision_feature_select_strategy")
                or cfg.vision_feature_select_strategy}

    def _reads_last_layer(self, args: dict[str, Any]) -> bool:
        return args["vision_feature_select_strategy"] == "default" and \
            args["vision_feature_layer"] in (-1, len(self.base.vision_tower.encoder.layer))

    def _tiles(self, kwargs: dict[str, Any], per_tile: int) -> list[int]:
        """Tiles per image, checked against the tiles in pixel_values."""
        tiles = self._tiles_per_image(kwargs["input_ids"], per_tile)
        if sum(tiles) != kwargs["pixel_values"].shape[0]:
            raise ValueError(f"the prompts' placeholder runs hold {sum(tiles)} tiles but pixel_values has "
                             f"{kwargs['pixel_values'].shape[0]}; each image needs its own placeholder run from the "
                             "processor")
        return tiles

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = self.inner_model(("vision_tower", "pixel_shuffle"), "model.model",
                                     "InternVLForConditionalGeneration")

    def package(self, features: list[torch.Tensor], extras: dict[str, list[torch.Tensor]]) -> Any:
        # InternVL's forward takes one tensor, not a list per image
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])

    def _cls_layer(self, feature_layer: int) -> torch.nn.Module:
        layers = self.base.vision_tower.encoder.layer
        idx = feature_layer - 1 if feature_layer >= 0 else len(layers) + feature_layer
        if not 0 <= idx < len(layers):
            raise ValueError(f"vision_feature_layer={feature_layer!r} reads the patch embeddings; fastervlm needs a "
                             "transformer layer's [CLS] row")
        return layers[idx].attention

    def _tiles_per_image(self, input_ids: torch.Tensor, per_tile: int) -> list[int]:
        tiles = []
        for row in (input_ids == self.image_token_id()):
            pos = row.nonzero().flatten()
            if pos.numel() == 0:
                continue
            breaks = (pos.diff() > 1).nonzero().flatten() + 1
            bounds = [0, *breaks.tolist(), pos.numel()]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if (b - a) % per_tile:
                    raise ValueError(f"an image placeholder run has {b - a} tokens, not a multiple of the "
                                     f"{per_tile} tokens per tile; check the processor's image_seq_length")
                tiles.append((b - a) // per_tile)
        return tiles

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        args = self._feature_args(kwargs)
        layer, strategy = args["vision_feature_layer"], args["vision_feature_select_strategy"]
        pv = kwargs["pixel_values"]
        reducers = {name: fn for name, fn in (("cls_attention", cls_row), ("vflow_importance", global_importance))
                    if name in needs}
        if reducers and (strategy != "default" or isinstance(layer, (list, tuple))):
            raise ValueError(f"{sorted(reducers)} on InternVL need vision_feature_select_strategy='default' and a "
                             f"single vision_feature_layer, got {strategy!r} / {layer!r}")
        with contextlib.ExitStack() as stack:
            caps = {name: stack.enter_context(self.capture(self._cls_layer(layer), fn))
                    for name, fn in reducers.items()}
            out = self.base.get_image_features(pixel_values=pv, return_dict=True, **args)
        per_patch = {name: torch.cat(self.captured(cap))[:, 1:] for name, cap in caps.items()}  # [CLS] dropped
        feats = out.pooler_output  # [tiles, tokens per tile, D]
        per_tile = feats.shape[1]
        tiles = self._tiles(kwargs, per_tile)
        side = int(round(per_tile ** 0.5))
        scores = {}
        for name, rows in per_patch.items():  # [tiles, patches] -> [tiles, tokens per tile]: a token sums its block
            src = self._shuffle_groups(rows.shape[1]).to(rows.device)  # [tokens per tile, 4] source patches
            scores[name] = rows[:, src].sum(-1)
        images, start = [], 0
        for n in tiles:
            im = ImageTokens(features=feats[start:start + n].flatten(0, 1), grid=[(side, side)] * n)
            if n > 1:  # tiles are the crops of a holistic budget (a one-tile image is split spatially instead)
                im.signals["crop_ids"] = torch.arange(n, device=feats.device).repeat_interleave(per_tile)
            for name, score in scores.items():
                im.signals[name] = score[start:start + n].flatten()
            if "cls_attention" in scores:
                im.signal_source = "cls_attention(InternViT [CLS] row, summed over each pixel-shuffled 2x2 block)"
            start += n
            images.append(im)
        return images

    def encode_vision(self, kwargs: dict[str, Any], stage: Any, spec: Any) -> list[ImageTokens]:
        """FlowCut inside InternViT, one tile at a time (the per-step amount depends on the tile's attention
        entropy; one amount per batch would make a batch differ from its samples). An image's budget is split
        evenly over its tiles (the first tiles take the remainder), so exactly ``keep`` tokens per image leave the
        encoder."""
        args = self._feature_args(kwargs)
        if not self._reads_last_layer(args):
            raise ValueError(f"{spec.name} inside InternViT needs vision_feature_select_strategy='default' and "
                             f"vision_feature_layer=-1 (the defaults), got {args['vision_feature_select_strategy']!r} "
                             f"/ {args['vision_feature_layer']!r}; give layer=K for its LLM-stage variant")
        layers = self.base.vision_tower.encoder.layer
        read = len(layers) - 1
        vc = self.model.config.vision_config
        side_p = vc.image_size[0] // vc.patch_size[0] if isinstance(vc.image_size, (list, tuple)) \
            else vc.image_size // vc.patch_size
        pv = kwargs["pixel_values"]
        groups = self._shuffle_groups(side_p * side_p).to(pv.device)  # [tokens per tile, 4] source patches
        per_tile = groups.shape[0]
        tiles = self._tiles(kwargs, per_tile)
        if read < 1 and stage.budget(per_tile) < per_tile:
            raise ValueError(f"{spec.name} needs at least one InternViT layer before the last ({len(layers)} layers)")
        side = int(round(per_tile ** 0.5))
        images, start = [], 0
        for n in tiles:
            target = stage.budget(n * per_tile)
            feats, kept = [], []
            for t in range(n):
                tile = pv[start + t:start + t + 1]
                out, idx = flowcut_in_tower(
                    self, layers, lambda i: layers[i].attention, read, target // n + (t < target % n),
                    float(stage.options.get("decay", 0.5)),
                    lambda tile=tile: self.base.get_image_features(pixel_values=tile, return_dict=True, **args),
                    groups, refill=True)
                feats.append(out.pooler_output[0])
                kept.append(idx + t * per_tile)
            start += n
            images.append(ImageTokens(features=torch.cat(feats), grid=[(side, side)] * n, kept=torch.cat(kept),
                                      signal_source="FlowCut information flow, inside InternViT (whole 2x2 blocks)"))
        return images

    def _shuffle_groups(self, n_patches: int) -> torch.Tensor:
        side = int(round(n_patches ** 0.5))
        idx = torch.arange(n_patches, dtype=torch.float32).view(1, side, side, 1)
        out = self.base.pixel_shuffle(idx, scale_factor=self.model.config.downsample_ratio)
        return out.reshape(-1, out.shape[-1]).round().long()
