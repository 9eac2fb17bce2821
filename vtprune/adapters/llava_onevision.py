"""LLaVA-OneVision (``llava_onevision``): LLaVA-NeXT's AnyRes packing with a SigLIP tower and AnyRes-max-9.

Packing differs from NeXT in two ways: a crop map larger than 1.1² × 9 sub-images of tokens is *bilinearly
down-sampled* before the newline column is added, and an image without crops gets one trailing newline. Features are
always the model's own packed tokens (``get_image_features``); only the layout is read separately: the model's own
packing run on index maps without down-sampling gives every token's source exactly, and, where the model
down-samples, its own packing of the same maps gives the newline slots and the down-sampled shape, whose tokens each
take the source patch of largest bilinear weight (``nearest-exact``): their crop id, coordinates and signals.

Signal: SigLIP has no [CLS]. ``cls_attention`` (``fastervlm``, ``holov``) is a documented substitute, the attention
each patch *receives* (mean over its sub-image's queries, head mean) in the ViT layer feeding the projector; the
report's ``signal`` says so. ``fastervlm`` ranks an image's packed tokens as one (no ``subimage_rank``: the reference's
"top T per sub-image, then unpad" has no counterpart once the crop map is resampled). ``globalcom2`` needs [CLS]
logits and is refused at ``prune()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from ..probes import received_attention
from .base import Adapter, ImageTokens
from .llava import LlavaNextAdapter

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"llava_onevision": "LlavaOnevisionAdapter"}

SIGNAL = ("received attention (mean over the sub-image's queries, head mean) of the ViT layer feeding the projector, "
          "mapped through packing; a [CLS] substitute, not FasterVLM's [CLS] signal")


class LlavaOnevisionAdapter(LlavaNextAdapter):
    prompt = "<|im_start|>user {img}\n{q}<|im_end|>\n<|im_start|>assistant\n"
    provides = ("cls_attention", "vflow_importance", "grid", "crop_ids", "coords")
    encoder_keys = ("pixel_values", "image_sizes", "batch_num_images")
    cls_reducer = staticmethod(received_attention)
    check_method = Adapter.check_method  # cls_attention is served by the substitute above: no [CLS] refusal

    def _run_tower(self, kwargs: dict[str, Any], needs: set[str], extra: dict[str, Any]) -> tuple:
        # as the model's forward: an image of a multi-image sample (batch_num_images > 1) runs as its base image only
        return super()._run_tower(kwargs, needs, {**extra, "batch_num_images": kwargs.get("batch_num_images")})

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        images = super().encode(kwargs, needs & set(self.provides))  # NeXT's encode also serves optional signals
        for im in images:
            if im.signal_source:  # NeXT's text names a [CLS] row, which SigLIP has not
                im.signal_source = SIGNAL if "cls_attention" in needs else "VFlowOpt importance per sub-image (ViT " \
                    "layer feeding the projector), mapped through packing"
        return images

    def _pack_layout(self, kwargs: dict[str, Any], per_sub: int, strategy: str, dev: torch.device
                     ) -> tuple[list[int], list[torch.Tensor]]:
        cfg, sizes, counts = self.model.config, kwargs["image_sizes"], kwargs.get("batch_num_images")
        single = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        n_sub = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if one else 1
                 for s, one in zip(sizes, single)]
        maps = [torch.arange(k * per_sub, device=dev, dtype=torch.float32).view(k, per_sub, 1) for k in n_sub]
        newline = torch.tensor([-1.0], device=dev)
        # the model's forward packs with the config's ratio (it does not pass a vision_aspect_ratio argument on)
        exact, _ = self.base.pack_image_features(maps, sizes, image_newline=newline, vision_aspect_ratio="anyres_max_"
                                                 f"{10 ** 9}")  # never down-samples: packing only moves tokens
        packed, _ = self.base.pack_image_features(maps, sizes, image_newline=newline,
                                                  vision_aspect_ratio=cfg.vision_aspect_ratio)
        out = []
        for e, p in zip(exact, packed):
            e, p = e.flatten(), p.flatten()
            if p.numel() < e.numel():  # down-sampled: interpolated indices are >= 0, so only newlines read -1
                rows, full = int((p[per_sub:] < 0).sum()), e[per_sub:].view(int((e[per_sub:] < 0).sum()), -1)
                small = F.interpolate(full[None, None, :, :-1], size=(rows, (p.numel() - per_sub) // rows - 1),
                                      mode="nearest-exact")[0, 0]  # the source of largest bilinear weight
                e = torch.cat([e[:per_sub], F.pad(small, (0, 1), value=-1.0).flatten()])
            if not torch.equal(e < 0, p < 0):
                raise RuntimeError("vtprune: LLaVA-OneVision layout does not match the model's packing")
            out.append(e.round().long())
        return n_sub, out
