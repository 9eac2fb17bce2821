"""LLaVA-1.5 (``llava``) and LLaVA-NeXT AnyRes (``llava_next``) from transformers ≥ 5.

Features come from the model's own ``get_image_features`` (one call per prompt batch). The [CLS] signal is the
attention row of the vision layer whose hidden states feed the projector (``vision_feature_layer``), captured by
a probe on that one ViT layer while the tower keeps its own attention implementation (SDPA by default); the
language model is never touched.

LLaVA-NeXT layout: base image tokens, then the stitched and unpadded crop map with one ``image_newline`` token per
row. The layout is read by running the model's own ``pack_image_features`` on token indices, so it can never drift
from what the model does to the features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..probes import cls_logits, cls_row, global_importance
from .base import Adapter, ImageTokens, flowcut_in_tower

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"llava": "LlavaAdapter", "llava_next": "LlavaNextAdapter"}

_NO_CLS_TOWERS = ("siglip_vision_model", "siglip2_vision_model")


def _vision_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    for path in ("vision_model.encoder.layers", "encoder.layers", "transformer.layers"):
        mod: Any = tower
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        return mod
    raise ValueError(f"vtprune: cannot find the encoder layers of vision tower {type(tower).__name__}")


class LlavaAdapter(Adapter):
    provides = ("cls_attention", "cls_logits", "vflow_importance", "flow_stats", "grid")
    vision_stage = True
    #: probe reducer of ``cls_attention``: the [CLS] row; a family whose tower has no [CLS] names its substitute
    cls_reducer: Callable = staticmethod(cls_row)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = self.inner_model(("vision_tower", "get_image_features"), "model.model",
                                     "the *ForConditionalGeneration classes of LLaVA and LLaVA-NeXT")

    # ---- signals ------------------------------------------------------------------------------------------------
    def _cls_layer(self, feature_layer: Any) -> torch.nn.Module:
        layers = _vision_layers(self.base.vision_tower)
        k = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else int(feature_layer)
        # hidden_states[k] is the output of ViT layer k-1 (entry 0 is the embeddings)
        idx = k - 1 if k >= 0 else len(layers) + k
        if not 0 <= idx < len(layers):
            raise ValueError(f"vision_feature_layer={feature_layer!r} reads the patch embeddings; there is no "
                             "attention layer whose [CLS] row could score them (fastervlm needs a transformer layer)")
        return layers[idx].self_attn

    def check_method(self, spec) -> None:
        super().check_method(spec)
        vt = self.model.config.vision_config.model_type
        if "cls_attention" in spec.requires and vt in _NO_CLS_TOWERS:
            raise ValueError(f"method {spec.name!r} needs [CLS] attention but this model's vision tower ({vt}) has no "
                             "[CLS] token; use divprune, random or uniform")

    # ---- features ------------------------------------------------------------------------------------------------
    def _feature_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        return {"vision_feature_layer": cfg.vision_feature_layer if layer is None else layer,
                "vision_feature_select_strategy": cfg.vision_feature_select_strategy if strategy is None else strategy}

    def _run_tower(self, kwargs: dict[str, Any], needs: set[str], extra: dict[str, Any]):
        args = self._feature_args(kwargs)
        caps: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            if "cls_attention" in needs:
                caps["cls_attention"] = stack.enter_context(
                    self.capture(self._cls_layer(args["vision_feature_layer"]), self.cls_reducer))
            if "vflow_importance" in needs:  # VFlowOpt reads the layer that feeds the projector
                caps["vflow_importance"] = stack.enter_context(
                    self.capture(self._cls_layer(args["vision_feature_layer"]), global_importance))
            if "cls_logits" in needs:  # GlobalCom² reads the last ViT layer's logits, whatever feeds the projector
                caps["cls_logits"] = stack.enter_context(self.capture(self._cls_layer(-1), cls_logits))
            out = self.base.get_image_features(pixel_values=kwargs["pixel_values"], **extra, **args, return_dict=True)
        rows = {}
        for name, cap in caps.items():
            row = torch.cat(self.captured(cap))  # [sub-images, 1 + patches], head mean
            if args["vision_feature_select_strategy"] == "default":
                row = row[:, 1:]  # align with the patch tokens the projector receives
            rows[name] = row
        return out, rows, args

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        extra = {"image_sizes": kwargs["image_sizes"]} if kwargs.get("image_sizes") is not None else {}
        out, rows, _ = self._run_tower(kwargs, needs, extra)
        feats = list(out.pooler_output)
        cls = rows.get("cls_attention")
        extra_rows = {k: v for k, v in rows.items() if k != "cls_attention"}
        if cls is not None and (cls.shape[0] != len(feats) or any(f.shape[0] != cls.shape[1] for f in feats)):
            raise ValueError("fastervlm: [CLS] attention rows do not line up with the image features of this vision "
                             "tower (variable-size images?); use divprune, random or uniform")
        images = []
        for i, f in enumerate(feats):
            n = f.shape[0]
            side = int(round(n ** 0.5))
            im = ImageTokens(features=f, grid=(side, side) if side * side == n else None)
            if cls is not None:
                im.signals["cls_attention"] = cls[i]
                im.signal_source = "cls_attention(ViT layer feeding the projector, head mean)"
            for name, rows in extra_rows.items():
                im.signals[name] = rows[i]
            images.append(im)
        return images


    def encode_vision(self, kwargs: dict[str, Any], stage: Any, spec: Any) -> list[ImageTokens]:
        """FlowCut inside the CLIP tower: per-layer statistics from the probe, a pre-hook on every later layer drops
        patches (hidden states are the only per-token input of a CLIP layer: no mask, no positions).

        Each image runs through the tower on its own: FlowCut's per-step amount depends on the image's attention
        entropy, and one common amount per batch (the reference) would make a batch differ from its samples.
        """
        args = self._feature_args(kwargs)
        layer = args["vision_feature_layer"]
        if args["vision_feature_select_strategy"] != "default" or not isinstance(layer, int):
            raise ValueError(f"{spec.name} needs the [CLS] token and one feature layer (strategy 'default'), got "
                             f"{args['vision_feature_select_strategy']!r} / {layer!r}")
        layers = _vision_layers(self.base.vision_tower)
        read = layer - 1 if layer >= 0 else len(layers) + layer  # the layer whose output feeds the projector
        cfg = self.model.config.vision_config
        n = (cfg.image_size // cfg.patch_size) ** 2
        target = stage.budget(n)
        if read < 1 and target < n:
            raise ValueError(f"{spec.name} needs at least one ViT layer before the one feeding the projector "
                             f"(vision_feature_layer={layer}, {len(layers)} layers)")
        side = int(round(n ** 0.5))
        images = []
        groups = torch.arange(n, device=kwargs["pixel_values"].device)[:, None]  # every patch is one LLM token
        for pv in kwargs["pixel_values"].split(1):
            out, idx = flowcut_in_tower(
                self, layers, lambda i: layers[i].self_attn, read, target, float(stage.options.get("decay", 0.5)),
                lambda pv=pv: self.base.get_image_features(pixel_values=pv, **args, return_dict=True), groups)
            f = out.pooler_output[0]
            full = f.new_zeros(n, f.shape[-1]).index_copy(0, idx, f)  # only the kept rows are ever gathered
            images.append(ImageTokens(features=full, grid=(side, side), kept=idx,
                                      signal_source="FlowCut information flow, inside the ViT"))
        return images


class LlavaNextAdapter(LlavaAdapter):
    provides = ("cls_attention", "cls_logits", "vflow_importance", "grid", "crop_ids", "coords", "subimage_rank",
                "crop_grid")
    encode_vision = Adapter.encode_vision  # AnyRes packing after in-encoder pruning is not supported yet
    vision_stage = False

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        """Packed tokens of every image (base, then the unpadded crop map with a newline after every row) and the
        signals ``needs`` asks for, all per packed token:

        * ``cls_attention`` / ``cls_logits`` / ``vflow_importance``: each sub-image's own ViT row, mapped through the
          model's packing (newline tokens 0).
        * ``subimage_rank``: rank (0 = highest, ties to the lower patch index) of the token's ``cls_attention`` among
          *all* patches of its sub-image as the ViT saw it, i.e. before unpadding removed any: a selector keeping
          "top T per sub-image, then unpad" keeps rank < T. Newline tokens get the sub-image size (never < T).
        * ``crop_ids`` (0 = base image, 1 + r·cols + c = crop at grid cell (r, c), the processor's raster order),
          ``crop_grid`` (the image's crop grid (rows, cols) on every token) and ``coords`` (patch centres in the
          whole image, unpadded geometry): always cheap, built from the layout.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (from the processor) alongside pixel_values")
        # the rank is computed from the [CLS] row, so asking for it captures the row too
        tower_needs = needs | ({"cls_attention"} if "subimage_rank" in needs else set())
        out, rows_by_signal, args = self._run_tower(kwargs, tower_needs, {"image_sizes": image_sizes})
        feats = list(out.pooler_output)
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        has_cls = cfg.vision_config.model_type not in _NO_CLS_TOWERS  # "full" keeps [CLS] where the tower has one
        per_sub = side * side + (1 if args["vision_feature_select_strategy"] == "full" and has_cls else 0)
        rank_rows = None
        if "subimage_rank" in needs:
            row = rows_by_signal["cls_attention"].float()  # [sub-images, per_sub]
            row = row.masked_fill(torch.isnan(row), float("-inf"))  # no score never outranks a score
            order = torch.sort(row, dim=1, descending=True, stable=True).indices  # stable: ties to the lower patch
            rank_rows = torch.empty_like(order).scatter_(1, order, torch.arange(row.shape[1], device=row.device)
                                                         .expand_as(order))
        dev = feats[0].device
        n_sub, layout = self._pack_layout(kwargs, per_sub, args["vision_feature_select_strategy"], dev)
        images, start = [], 0
        for i, (f, src) in enumerate(zip(feats, layout)):
            if src.numel() != f.shape[0]:
                raise RuntimeError("vtprune: LLaVA-NeXT layout does not match the packed features")
            newline = src < 0
            n_rows = int(newline.sum())
            if n_sub[i] > 1:
                crop = f.shape[0] - per_sub - n_rows
                grid = [(side, side), (n_rows, crop // max(n_rows, 1))]
            else:
                grid = (side, side)
            im = ImageTokens(features=f, newline=newline, grid=grid)
            for name, rows in rows_by_signal.items():
                if name not in needs:
                    continue
                flat = rows[start:start + n_sub[i]].flatten()
                im.signals[name] = torch.where(newline, 0.0, flat[src.clamp(min=0)])
                im.signal_source = "per sub-image ViT [CLS] row, mapped through unpad"
            if rank_rows is not None:
                flat = rank_rows[start:start + n_sub[i]].flatten().to(dev)
                im.signals["subimage_rank"] = torch.where(newline, per_sub, flat[src.clamp(min=0)])
            im.signals["crop_ids"] = torch.where(newline, 0, src.clamp(min=0) // per_sub)
            if "crop_grid" in needs:
                gh, gw = get_anyres_image_grid_shape(image_sizes[i], cfg.image_grid_pinpoints,
                                                     cfg.vision_config.image_size) if n_sub[i] > 1 else (0, 0)
                im.signals["crop_grid"] = torch.tensor([int(gh), int(gw)], device=dev).expand(f.shape[0], 2)
            im.signals["coords"] = self._coords(f.shape[0], side, n_rows if n_sub[i] > 1 else 0, dev)
            start += n_sub[i]
            images.append(im)
        return images

    def _pack_layout(self, kwargs: dict[str, Any], per_sub: int, strategy: str, dev: torch.device
                     ) -> tuple[list[int], list[torch.Tensor]]:
        """Sub-images per image as the tower ran them, and per image the source of every packed token
        (sub-image · per_sub + patch; -1 = newline), LongTensor[n].

        Read by running the model's own packing on index maps (newline marker -1): LLaVA-NeXT's packing only moves
        and drops tokens, so the indices come out exact. A family whose packing mixes tokens overrides this.
        """
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        n_sub = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) for s in kwargs["image_sizes"]]
        maps = [torch.arange(k * per_sub, device=dev, dtype=torch.float32).view(k, per_sub, 1) for k in n_sub]
        layout, _ = self.base.pack_image_features(maps, kwargs["image_sizes"], strategy,
                                                  image_newline=torch.tensor([-1.0], device=dev))
        return n_sub, [lay.flatten().round().long() for lay in layout]

    @staticmethod
    def _coords(n: int, side: int, n_rows: int, dev: torch.device) -> torch.Tensor:
        """[n, 2] patch-centre (y, x) of every packed token in the whole image, in [0, 1).

        The base image's side×side grid covers the image; the unpadded crop map (n_rows rows, each followed by a
        newline token) covers it too, at higher resolution. Newline tokens get their row's right edge.
        """
        t = torch.arange(n, device=dev, dtype=torch.float32)
        base = t < side * side
        yx = torch.stack([(t // side + 0.5) / side, (t % side + 0.5) / side], -1)
        if n_rows:
            width = (n - side * side) // n_rows - 1  # tokens per row, newline excluded
            c = t - side * side
            crop = torch.stack([(c // (width + 1) + 0.5) / n_rows, ((c % (width + 1)).clamp(max=width - 1) + 0.5)
                                / width], -1)
            yx = torch.where(base[:, None], yx, crop)
        return yx.clamp(max=1 - 1e-6)
