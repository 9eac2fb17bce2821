"""What every adapter shares: turning one call's inputs into a pruned call.

The family file supplies ``encode`` (run the model's own feature extraction once, plus the signals a selector
asked for, plus the token layout); this file assigns images to samples, runs the selector per image, and rewrites
``input_ids`` / ``attention_mask`` / positions / ``labels`` so the unchanged model consumes only the kept tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..call import cached_length
from ..config import PruneConfig, StageSpec
from ..kernels import gather_tokens
from ..probes import Capture, flow_stats, last_row, probe_name
from ..report import ImageReport, PruneReport, prefill_flops
from ..selection import Offer, select
from ..selectors.base import SelectorSpec, topk_sorted
from ..selectors.flowcut import cut_amount, flow_score

__all__ = ["Adapter", "ImageTokens", "cached_length", "flowcut_in_tower", "left_compact"]

# The in-tower FlowCut run of the running context, if any: (layers, before, after). The layer hooks are installed
# once, at prune() time, and act only for the run of their own context, so a second thread running the same tower
# at the same time is neither pruned by nor for the first (hooks registered per call would race with its forward).
_TOWER_RUN: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("vtprune_tower_run", default=None)


def _tower_pre_hook(i: int, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    run = _TOWER_RUN.get()
    if run is None or run[0][i] is not module:
        return None
    return run[1](i, args, kwargs)


def _tower_post_hook(i: int, module: torch.nn.Module, args: tuple, out: Any) -> Any:
    run = _TOWER_RUN.get()
    if run is None or run[0][i] is not module:
        return None
    return run[2](i, out)


def install_tower_hooks(layers: torch.nn.ModuleList) -> list[Any]:
    """The hooks FlowCut's in-tower loop acts through, on every layer of a vision tower (handles to remove)."""
    handles = []
    for i, layer in enumerate(layers):
        if i > 0:
            handles.append(layer.register_forward_pre_hook(functools.partial(_tower_pre_hook, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(functools.partial(_tower_post_hook, i)))
    return handles


def left_compact(keep: torch.Tensor) -> torch.Tensor:
    """keep BoolTensor[B, L] -> LongTensor[B, L'] of the kept positions in their order, rows left-padded with -1.

    Left padding keeps every row's last position real, which generate and last-token probes rely on.
    """
    b = keep.shape[0]
    n_keep = keep.sum(1)
    new_len = int(n_keep.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    shift = new_len - n_keep
    j = torch.arange(new_len, device=keep.device).expand(b, new_len)
    src = order.gather(1, (j - shift[:, None]).clamp(min=0))
    return src.masked_fill(j < shift[:, None], -1)


@dataclass
class ImageTokens:
    """One image as the language model would receive it.

    ``features``: [n, D] post-projector tokens, in the order the model injects them.
    ``newline``: BoolTensor[n] marking layout-only tokens (LLaVA-NeXT ``image_newline``), or None.
    ``grid``: (h, w) or list of (h, w) segments covering the non-newline tokens in raster order, or None.
    ``signals``: per-token signals over all n tokens, e.g. ``cls_attention`` [n].
    """

    features: torch.Tensor
    newline: torch.Tensor | None = None
    grid: Any = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    signal_source: str = ""
    kept: torch.Tensor | None = None  # set when the tokens were already chosen inside the encoder (vision stage)
    #: other per-token encoder outputs the model consumes with the features, token axis first ([n, ...], e.g.
    #: Qwen3-VL's DeepStack features): gathered with the same kept indices and handed to ``Adapter.package``
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def flowcut_in_tower(adapter: Adapter, layers: Any, attention: Any, read: int, target: int, decay: float,
                     run: Any, groups: torch.Tensor, refill: bool = False) -> tuple[Any, torch.Tensor]:
    """Run ``run()`` (one image through a [CLS]-first ViT) with FlowCut pruning between its layers.

    ``layers[read]`` is the layer whose output is read; ``attention(i)`` is layer i's attention module (probed for
    ``flow_stats``). ``groups`` LongTensor[U, g]: the patches of each *unit*, which is kept or dropped whole (a
    patch: g = 1; InternVL: the 2×2 block that becomes one LLM token); a unit scores the sum of its patches.
    ``target`` units survive. The pre-hooks of layers 1..read (installed at prune time by ``install_tower_hooks``)
    drop units from the hidden states (the only per-token input of these layers: no mask, no positions), kept patches
    staying in ascending order behind [CLS]. With ``refill`` the hook after ``layers[read]`` scatters its output
    back onto the full patch grid (zeros where dropped),
    for towers whose feature path needs the whole grid (pixel shuffle). Returns (``run()``'s output, kept units
    LongTensor[target], ascending).
    """
    dev = groups.device
    n_units = groups.shape[0]
    n_patches = groups.numel()
    state: dict[str, Any] = {"cum": None, "units": torch.arange(n_units, device=dev)}
    caps = [adapter.capture(attention(i), flow_stats) for i in range(read)]
    if not adapter.tower_hooked(layers):
        raise RuntimeError("vtprune: the vision-tower hooks for in-tower pruning are not installed; call "
                           "vtprune.unprune(model) and prune again")

    def current_patches() -> torch.Tensor:
        return groups[state["units"]].flatten().sort().values

    def before(i: int, args: tuple, kwargs: dict[str, Any]):
        if not 1 <= i <= read:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        units = state["units"]
        if units.numel() <= target:
            return None
        patches = current_patches()
        where = torch.searchsorted(patches, groups[units])  # [u, g]: each unit's patches in the current sequence
        stats = adapter.captured(caps[i - 1])[-1][:, :, 1:].float()  # patches only; [CLS] stays in front
        f = flow_score(stats)[:, where].sum(-1)
        state["cum"] = f if state["cum"] is None else decay * state["cum"] + (1 - decay) * f
        rho = (read - 1) - (i - 1)  # pruning layers left
        if rho % 2:
            return None
        new = max(units.numel() - cut_amount(stats[:, 0][:, where].sum(-1), target, rho), target) \
            if rho > 0 else target
        if new >= units.numel():
            return None
        keep = topk_sorted(state["cum"], new)
        state["cum"], state["units"] = state["cum"].gather(1, keep), units[keep[0]]
        rows = torch.searchsorted(patches, current_patches())
        hidden = gather_tokens(hidden, torch.cat([rows.new_zeros(1), rows + 1])[None].expand(hidden.shape[0], -1))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def after(i: int, out: Any):
        hidden = out[0] if isinstance(out, tuple) else out
        if not refill or i != read or hidden.shape[1] == n_patches + 1:
            return None
        full = hidden.new_zeros(hidden.shape[0], n_patches + 1, hidden.shape[-1])
        full[:, 0] = hidden[:, 0]
        full[:, current_patches() + 1] = hidden[:, 1:]
        return (full, *out[1:]) if isinstance(out, tuple) else full

    token = _TOWER_RUN.set((layers, before, after))
    try:
        with contextlib.ExitStack() as stack:
            for c in caps:
                stack.enter_context(c)
            out = run()
    finally:
        _TOWER_RUN.reset(token)
    return out, state["units"]


class Adapter:
    """Base class; family files override ``encode`` and the attributes below.

    A family file is a small record: ``FAMILIES`` (the HF model_types it serves), an Adapter subclass that says
    where the image placeholders are and how features map to LLM tokens (``encode``, and ``encode_vision`` where
    pruning inside the tower is supported), which signals it can give (``provides``), how positions are built
    (``original_positions``, ``finish``), and its plain prompt layout (``placeholder``, ``prompt``). Everything
    family-neutral — selection, the rewrite, positions bookkeeping, caches, the in-LLM stages, reports — is here or
    in ``selection`` / ``llm``.
    """

    #: the image placeholder a raw prompt holds (the processor expands it), and a plain one-question prompt layout
    #: with ``{img}`` and ``{q}`` (used without a chat template, e.g. by the lmms-eval integration and the tests)
    placeholder: str = "<image>"
    prompt: str = "USER: {img}\n{q} ASSISTANT:"

    #: signals this family can provide
    provides: tuple[str, ...] = ()
    #: True where ``encode_vision`` prunes inside the vision tower (else FlowCut runs its LLM-stage variant)
    vision_stage: bool = False
    #: call arguments that only feed the vision encoder; the pruned call gets features instead
    encoder_keys: tuple[str, ...] = ("pixel_values", "image_sizes")

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._saved_impl: str | None = None

    def inner_model(self, attrs: tuple[str, ...], where: str, supported: str) -> torch.nn.Module:
        """``model.model``, checked to have ``attrs``; a clear error names what is missing and what is supported."""
        base = getattr(self.model, "model", None)
        missing = [a for a in attrs if not hasattr(base, a)] if base is not None else list(attrs)
        if missing:
            raise ValueError(f"{type(self.model).__name__} has no {', '.join(missing)} at {where}; vtprune supports "
                             f"{supported}")
        return base

    # ---- family hooks -------------------------------------------------------------------------------------------
    def check_method(self, spec: SelectorSpec) -> None:
        missing = [s for s in spec.requires if s not in self.provides]
        if missing:
            from ..registry import methods_for

            raise ValueError(
                f"method {spec.name!r} needs the signal(s) {missing}, which {type(self.model).__name__} "
                f"({self.model.config.model_type}) cannot provide; methods this family can run: "
                f"{', '.join(methods_for(self.provides))}")

    def check_config(self, config: Any) -> None:
        """Refuse, at prune(), a resolved config this family cannot honour (default: every config is fine)."""

    def attach(self, needs: set[str], in_tower: bool = False) -> None:
        """Install the vision-tower attention probe when a selector needs an attention signal, and the tower's layer
        hooks for a stage that prunes inside it (undone by detach).

        Only the vision sub-config's implementation changes, to a wrapper that calls the same implementation.
        """
        if needs & {"cls_attention", "cls_logits", "vflow_importance", "flow_stats"}:
            self._saved_impl = self.model.config.vision_config._attn_implementation
            self.model.set_attn_implementation({"vision_config": probe_name(self._saved_impl or "sdpa")})
        if in_tower:
            self._tower_handles = install_tower_hooks(self.tower_layers())

    def tower_layers(self) -> torch.nn.ModuleList:
        """The vision tower's encoder layers (the layouts of the towers vtprune supports)."""
        tower = getattr(getattr(self.model, "model", None), "vision_tower", None)
        for path in ("vision_model.encoder.layers", "encoder.layers", "encoder.layer", "transformer.layers"):
            mod: Any = tower
            for part in path.split("."):
                mod = getattr(mod, part, None)
            if isinstance(mod, torch.nn.ModuleList):
                return mod
        raise ValueError(f"vtprune: cannot find the encoder layers of the vision tower of {type(self.model).__name__}")

    def tower_hooked(self, layers: torch.nn.ModuleList) -> bool:
        return bool(self.__dict__.get("_tower_handles")) and layers is self.tower_layers()

    def detach(self) -> None:
        for h in self.__dict__.pop("_tower_handles", ()):
            h.remove()
        if self._saved_impl is not None:
            # a choice the user made after prune() (set_attn_implementation) is theirs: restore only our probe
            if self.model.config.vision_config._attn_implementation == probe_name(self._saved_impl):
                self.model.set_attn_implementation({"vision_config": self._saved_impl})
            self._saved_impl = None

    def __setstate__(self, d: dict[str, Any]) -> None:
        # a pickled pruned model loaded in a new process: its config names the probe, register it there too
        self.__dict__.update(d)
        if self._saved_impl is not None:
            probe_name(self._saved_impl)

    def inner_module(self) -> torch.nn.Module | None:
        """The inner model (``model.model``) that the top-level forward calls; guarded against direct calls."""
        return getattr(self.model, "model", None)

    def capture(self, module: torch.nn.Module, reducer: Any) -> Capture:
        if self._saved_impl is None:
            raise RuntimeError("vtprune: the vision attention probe is not installed; call vtprune.unprune(model) and "
                               "prune again")
        return Capture(module, reducer)

    @staticmethod
    def captured(cap: Capture) -> list[torch.Tensor]:
        if not cap.results:
            raise RuntimeError("vtprune: the vision attention probe did not fire (was the vision attention "
                               "implementation changed after prune?); call vtprune.unprune(model) and prune again")
        return cap.results

    def encode(self, kwargs: dict[str, Any], needs: set[str]) -> list[ImageTokens]:
        raise NotImplementedError

    def encode_vision(self, kwargs: dict[str, Any], stage: StageSpec, spec: SelectorSpec) -> list[ImageTokens]:
        """Run the vision encoder with pruning inside it; images come back with ``kept`` set."""
        raise ValueError(f"method {spec.name!r} prunes inside the vision encoder, which vtprune does not support for "
                         f"{self.model.config.model_type!r} yet; give layer=K for its LLM-stage variant or use a "
                         "pre_llm method")

    def package(self, features: list[torch.Tensor], extras: dict[str, list[torch.Tensor]]) -> Any:
        """Kept features per image (and their ``extras``, per name a list per image) -> the ``mm_encoder_outputs``
        entry this family's forward expects (by default ``pooler_output`` = the list of per-image features)."""
        return BaseModelOutputWithPooling(pooler_output=features)

    def llm_hooks(self, first: int) -> list[Any]:
        """Hooks (removable handles) a family needs while in-LLM stages compact the sequence from decoder layer
        ``first`` on: for per-token inputs the model's own layer loop hands to layers after the compaction (Qwen3-VL
        adds DeepStack features at the visual positions after its first layers). Removed with the stages' own hooks;
        none by default."""
        return []

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor[B, L]: the index, within its sample, of the image every position belongs to (-1 for text),
        for the in-LLM stages (budgets per image). By default one run of placeholder tokens is one image; a family
        whose image spans several runs (tiles between text markers) overrides this."""
        is_img = input_ids == self.image_token_id()
        starts = is_img & ~torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
        return (starts.long().cumsum(1) - 1).masked_fill(~is_img, -1)

    def finish(self, kwargs: dict[str, Any], new: dict[str, Any], generate: bool) -> None:
        """Family-specific touches on the rewritten call (e.g. Qwen's text position row and ``rope_deltas``)."""

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def pad_token_id(self) -> int:
        cfg = self.model.config
        for c in (cfg, getattr(cfg, "text_config", None)):
            pid = getattr(c, "pad_token_id", None) if c is not None else None
            if pid is not None and pid != self.image_token_id():
                return int(pid)
        return 0 if self.image_token_id() != 0 else 1

    def text_config(self) -> Any:
        return getattr(self.model.config, "text_config", self.model.config)

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The language model's decoder layers (the same path in every family vtprune supports)."""
        return self.model.model.language_model.layers

    def text_attention(self) -> str:
        """The language model's attention implementation name."""
        return self.text_config()._attn_implementation

    def set_text_attention(self, name: str) -> None:
        self.model.set_attn_implementation({"text_config": name})

    def expert_layers(self) -> torch.nn.ModuleList | None:
        """Layers of a policy's action expert that read the language model's KV cache layer by layer (π0's expert
        layer i attends to cache layer i), so in-LLM stages re-lay their masks like decode steps; None for VLMs."""
        return None

    def action_layers(self) -> torch.nn.ModuleList:
        """Where a temporal selector records the action→vision attention of each control step: the language model's
        layers for autoregressive action tokens; a policy with an action expert overrides it."""
        return self.decoder_layers()

    #: the probe reducer of that recording: the newest query (an action token fed back during decoding)
    action_reducer = staticmethod(last_row)

    def set_action_attention(self, name: str | None) -> str | None:
        """Put the action layers on attention implementation ``name`` (None: leave them); returns the previous one,
        or None when they are the language model's layers (already probed by the in-LLM stages)."""
        return None

    def text_dims(self) -> tuple[int, int, int]:
        tc = self.text_config()
        return tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers

    # ---- shared machinery ---------------------------------------------------------------------------------------
    def prune_call(self, kwargs: dict[str, Any], stage: StageSpec, spec: SelectorSpec, config: PruneConfig,
                   generate: bool) -> tuple[dict[str, Any], PruneReport] | None:
        """Rewrite one prefill call; ``None`` means "run it unchanged" (no images, or not a prefill)."""
        for key in ("pixel_values_videos", "video_grid_thw"):
            if kwargs.get(key) is not None:
                raise ValueError(f"video inputs ({key}) are not supported by vtprune yet; run this call inside "
                                 "`with vtprune.disabled(model):` to use the unpruned model")
        if kwargs.get("pixel_values") is None:
            return None
        if cached_length(kwargs) > 0:
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("vtprune needs input_ids to find the image placeholders (got inputs_embeds); pass "
                             "input_ids, or run this call inside `with vtprune.disabled(model):`")
        if stage.where == "vision":
            images = self.encode_vision(kwargs, stage, spec)
        else:
            images = self.encode(kwargs, set(spec.requires) | set(spec.optional))
        owner = self._assign(input_ids, images)
        kept_idx, report, overrides = self._select(images, owner, stage, spec, config)
        new_kwargs = self._rewrite(kwargs, images, owner, kept_idx, config, generate, report, overrides)
        return new_kwargs, report

    def _assign(self, input_ids: torch.Tensor, images: list[ImageTokens]) -> list[tuple[int, int, torch.Tensor]]:
        """Map images (in order) to samples: (sample, image index in sample, placeholder positions [n])."""
        is_img = input_ids == self.image_token_id()
        counts = is_img.sum(1).tolist()
        out, i = [], 0
        for b, c in enumerate(counts):
            pos = is_img[b].nonzero().flatten()
            used, j = 0, 0
            while used < c and i < len(images):
                n = images[i].features.shape[0]
                out.append((b, j, pos[used:used + n]))
                used, i, j = used + n, i + 1, j + 1
            if used != c:
                raise ValueError(
                    f"sample {b} has {c} image placeholder tokens but the images given for it have {used} visual "
                    f"tokens ({len(images)} images in all for {len(counts)} samples); each image needs exactly one "
                    "placeholder run from the processor — check that the prompt's image count matches the images"
                )
        if i != len(images):
            raise ValueError(f"{len(images)} images were given but the prompts' placeholder runs hold only "
                             f"{i} of them; "
                             "each image needs its own placeholder run in input_ids")
        return out

    def _select(self, images, owner, stage: StageSpec, spec: SelectorSpec, config: PruneConfig):
        """Kept token indices per image (the shared ``selection.select``, batched over images of equal shape)."""
        report = PruneReport(stage=stage.where, positions=config.positions)
        # candidates: tokens offered to the selector; forced: layout tokens always kept (not counted)
        cand, forced, offers, todo = [], [], [], []
        for i, im in enumerate(images):
            n = im.features.shape[0]
            nl = im.newline if im.newline is not None else torch.zeros(n, dtype=torch.bool, device=im.features.device)
            if spec.newlines == "pool":
                c, f = torch.arange(n, device=nl.device), nl.new_zeros(0, dtype=torch.long)
            else:
                c, f = (~nl).nonzero().flatten(), nl.nonzero().flatten()
            cand.append(c)
            forced.append(f)
            if im.kept is None:  # else chosen inside the encoder already
                todo.append(i)
                offers.append(Offer(im.features[c], stage.budget(c.numel()), owner[i][1], grid=im.grid, signals={
                    s: im.signals[s][c] for s in spec.requires + spec.optional if s in im.signals}))
        choices = dict(zip(todo, select(spec, stage.options, config.seed, offers)))
        kept: list[torch.Tensor] = []
        overrides: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, im in enumerate(images):
            ch = choices.get(i)
            if ch is None:
                kept.append(im.kept)
            else:
                chosen = cand[i][ch.index]
                kept.append(torch.cat([chosen, forced[i]]).sort().values)
                if ch.merged is not None:
                    overrides[i] = (chosen, ch.merged)
            nl = im.newline
            report.images.append(ImageReport(
                sample=owner[i][0], image=owner[i][1], kept=kept[i], n_before=im.features.shape[0],
                method=spec.name, stage=stage.where, signal=im.signal_source, grid=im.grid, newline=nl,
                n_newline=int(nl[kept[i]].sum()) if nl is not None else 0,
                _timer=ch.timer if ch is not None else None, _share=ch.share if ch is not None else 1))
        return kept, report, overrides

    def _rewrite(self, kwargs, images, owner, kept_idx, config: PruneConfig, generate: bool, report: PruneReport,
                 overrides: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        input_ids = kwargs["input_ids"]
        b, length = input_ids.shape
        dev = input_ids.device
        keep = torch.ones(b, length, dtype=torch.bool, device=dev)
        for (s, _, pos), im, k in zip(owner, images, kept_idx):
            drop = torch.ones(im.features.shape[0], dtype=torch.bool, device=dev)
            drop[k.to(dev)] = False
            keep[s, pos[drop]] = False
        features = [gather_tokens(im.features[None], k[None].to(im.features.device))[0]
                    for im, k in zip(images, kept_idx)]
        for i, (chosen, toks) in overrides.items():  # merged tokens sit at their anchor's slot and position
            features[i][torch.searchsorted(kept_idx[i], chosen)] = toks.to(features[i].dtype)
        extras = {name: [im.extras[name].index_select(0, k.to(im.extras[name].device)) for im, k in
                         zip(images, kept_idx)] for name in (images[0].extras if images else {})}
        new = {k: v for k, v in kwargs.items() if k != "pixel_values"}
        new["mm_encoder_outputs"] = {"image": self.package(features, extras)}
        mask = kwargs.get("attention_mask")
        report.tokens_before = (mask.sum(1) if mask is not None else torch.full((b,), length)).tolist()
        if bool(keep.all()):  # nothing dropped: only the encoder input is replaced, the model does the rest
            report.tokens_after = list(report.tokens_before)
            report.token_map = torch.arange(length, device=dev).expand(b, length)
            self._flops(report)
            return new
        for key in self.encoder_keys:
            new.pop(key, None)
        token_map = left_compact(keep)
        report.token_map = token_map
        pad = token_map < 0
        src = token_map.clamp(min=0)
        new_len = src.shape[1]

        def take(t: torch.Tensor, fill: int | float) -> torch.Tensor:
            # per-token tensors are [B, L] (or [..., B, L] for 3-D positions): gather the last axis
            idx = src.expand(*t.shape[:-2], b, new_len) if t.dim() > 2 else src
            return t.gather(-1, idx).masked_fill(pad.expand_as(idx), fill)

        new["input_ids"] = take(input_ids, self.pad_token_id())
        full_mask = mask if mask is not None else torch.ones_like(input_ids)
        new["attention_mask"] = take(full_mask, 0)
        if kwargs.get("labels") is not None:
            new["labels"] = take(kwargs["labels"], -100)
        for name in ("token_type_ids", "mm_token_type_ids"):
            if kwargs.get(name) is not None:
                new[name] = take(kwargs[name], 0)
        if config.positions == "preserve":
            new["position_ids"] = take(self.original_positions(kwargs, generate), 0)
        else:
            new.pop("position_ids", None)
        self.finish(kwargs, new, generate)
        report.tokens_after = new["attention_mask"].sum(1).tolist()
        self._flops(report)
        return new

    def original_positions(self, kwargs: dict[str, Any], generate: bool) -> torch.Tensor:
        """Position ids the unpruned model would give this prompt ([B, L] for 1-D RoPE families)."""
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        if generate and mask is not None:
            # generate's own rule (GenerationMixin._prepare_position_ids_for_generation): cumsum over the mask
            return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        # forward's rule without a cache: arange over the sequence
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)

    def session_info(self, kwargs: dict[str, Any], new: dict[str, Any], config: PruneConfig) -> dict[str, Any] | None:
        """What calls continuing this pruned prefill's KV cache need (None if nothing was dropped): the caller's
        prompt ``orig_ids`` [B, L], the pruned prompt the language model consumed (``pruned_ids``, ``mask`` [B, L'],
        its ``positions`` and per-token type ids), and ``next_pos`` [B], the position after the prompt as the model
        saw it (None when the model built positions itself: its default, after the pruned cache, is then right)."""
        if new["input_ids"] is kwargs["input_ids"]:  # nothing dropped (see _rewrite); equal lengths alone are not
            return None  # enough: a batch row that lost tokens can leave the padded length unchanged
        orig_len, new_len = kwargs["input_ids"].shape[1], new["input_ids"].shape[1]
        pos = new.get("position_ids")
        return {"orig_ids": kwargs["input_ids"], "orig_len": orig_len, "new_len": new_len,
                "pruned_ids": new["input_ids"], "mask": new["attention_mask"], "positions": pos,
                "types": {k: new[k] for k in ("token_type_ids", "mm_token_type_ids") if new.get(k) is not None},
                "next_pos": None if pos is None else self.next_position(pos, new["attention_mask"])}

    def next_position(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B]: the position id right after the prompt (1-D RoPE: the last prompt token is text, never pruned,
        and under left padding it is the last column)."""
        return positions[..., -1] + 1

    def decode_call(self, kwargs: dict[str, Any], info: dict[str, Any], cached: int) -> dict[str, Any] | None:
        """Let a decode loop written against the unpruned prompt run unchanged: a 2-D attention mask laid out on the
        original sequence is re-laid on the pruned cache, and missing positions continue after the unpruned length
        (the model's default would continue after the shorter pruned cache)."""
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[0] != info["mask"].shape[0]:
            return None
        q, step = ids.shape[1], cached - info["new_len"]
        new = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == info["orig_len"] + step + q:
            new["attention_mask"] = torch.cat([info["mask"].to(mask), mask[:, info["orig_len"]:]], dim=1)
        if kwargs.get("position_ids") is None and info["next_pos"] is not None:
            new["position_ids"] = info["next_pos"][:, None] + step + torch.arange(q, device=ids.device)
        return new

    def continue_call(self, kwargs: dict[str, Any], info: dict[str, Any], cached: int) -> dict[str, Any]:
        """``generate`` continuing a KV cache that a pruned call filled (multi-turn chat with a reused cache).

        transformers expects ``input_ids`` to be the whole conversation so far, in the caller's (unpruned) layout;
        the cache holds the pruned prompt and the tokens after it. The call is re-expressed in the cache's layout:
        the pruned prompt, then everything after the caller's prompt (answers, the next turn), with its mask, its
        positions continuing after the unpruned prompt, and its token type ids.
        """
        ids, orig = kwargs.get("input_ids"), info["orig_ids"]
        consumed = info["orig_len"] + cached - info["new_len"]  # caller-layout tokens the cache already holds
        if ids is None or ids.shape[0] != orig.shape[0] or ids.shape[1] < consumed \
                or not torch.equal(ids[:, : info["orig_len"]], orig.to(ids.device)):
            got = "no input_ids" if ids is None else f"input_ids of shape {tuple(ids.shape)}"
            raise ValueError(
                f"this past_key_values was filled by a pruned call whose prompt had shape {tuple(orig.shape)} and "
                f"now holds {cached} entries; vtprune continues it only when input_ids is the whole conversation so "
                f"far (that prompt, then every token after it), as transformers expects, got {got}. Start a new "
                "cache (past_key_values=None) for another prompt")
        tail = ids[:, info["orig_len"]:]
        if bool((tail == self.image_token_id()).any()):
            raise ValueError("a new image in a call that continues a pruned KV cache is not supported: vtprune "
                             "prunes images in the prefill that starts a cache. Pass the whole conversation with "
                             "past_key_values=None, or run this call inside `with vtprune.disabled(model):`")
        new = {k: v for k, v in kwargs.items() if k not in self.encoder_keys}
        new["input_ids"] = torch.cat([info["pruned_ids"].to(ids.device), tail], 1)
        mask = kwargs.get("attention_mask")
        tail_mask = mask[:, info["orig_len"]:] if mask is not None else torch.ones_like(tail)
        new["attention_mask"] = torch.cat([info["mask"].to(tail_mask), tail_mask], 1)
        for k, t in info["types"].items():
            given = kwargs.get(k)
            rest = given[:, info["orig_len"]:] if given is not None else torch.zeros_like(tail)
            new[k] = torch.cat([t.to(rest), rest], 1)
        pos = info["positions"]
        if info["next_pos"] is not None and pos is not None:
            step = torch.arange(tail.shape[1], device=ids.device)
            after = (info["next_pos"][:, None] + step).to(pos)  # [B, T]
            if pos.dim() == 3:  # 3-D positions (Qwen): every rotary row continues alike
                after = after[None].expand(pos.shape[0], -1, -1).clone()
                if pos.shape[0] == 4:  # generate's layout: row 0 is the pruned sequence's own text position
                    m = new["attention_mask"].long()
                    after[0] = ((m.cumsum(-1) - 1).masked_fill(m == 0, 0))[:, -tail.shape[1]:].to(pos)
            new["position_ids"] = torch.cat([pos.to(ids.device), after], -1)
        else:
            new.pop("position_ids", None)
        return new

    def _flops(self, report: PruneReport) -> None:
        d, m, n_layers = self.text_dims()
        report.flops_before = prefill_flops(report.tokens_before, d, m, n_layers)
        report.flops_after = prefill_flops(report.tokens_after, d, m, n_layers)
