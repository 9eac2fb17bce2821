"""π0 (``pi0``, transformers ≥ 5.24): a PaliGemma VLM encodes the prefix — every present camera's SigLIP tokens,
then ``<bos>``, the task and ``\\n`` — once into a KV cache; a Gemma action expert then denoises an action chunk in
``num_steps`` passes, each attending to that cache layer by layer (the cache is cropped back to the prefix after each).

``pre_llm`` methods prune the prefix: each camera (one image, ``tokens_per_image`` SigLIP tokens; an absent camera has
none) keeps its own budget, the kept tokens keep their original positions, and every action-expert pass sees only the
kept prefix with the positions the unpruned prefix gives the action tokens. ``sample_actions`` builds the prefix
embeddings itself and hands the VLM ``inputs_embeds``, so the hooks are:

* ``sample_actions`` (an instance override, the ``generate`` pattern of ``api._Generate``): opens the call, records
  the inputs the VLM call will not see (``input_ids``, ``pixel_attention_mask``) and arms the SigLIP probe around it;
* a forward pre-hook on ``model.model.vlm``: selects per camera on the image rows of ``inputs_embeds`` (what the VLM
  would receive) and drops the others from ``inputs_embeds``, ``attention_mask``, ``position_ids``,
  ``token_type_ids`` (kept tokens keep their positions); its forward hook attaches the cache ``Session``;
* a forward pre-hook on ``model.model`` (``PI0Model.forward``): a call over a pruned prefix cache gets the 2-D
  ``attention_mask`` re-laid on the kept prefix (the model builds the expert's block mask and positions from it);
* a forward pre-hook on ``model.model.dit``: adds, per row, the number of dropped prefix tokens to the action tokens'
  positions, which the model counted over the kept prefix — they are then what the unpruned prefix gives them.

A training forward ``policy(..., actions=...)`` (the prefix built inside ``PI0Model.forward``) is pruned in
``prune_call`` (the shared forward pre-hook's seam): the prefix embeddings are built there, pruned, and handed to the
model as ``inputs_embeds`` with the kept mask and positions; the kept features stay differentiable.

Signal: SigLIP has no [CLS]; ``fastervlm`` / ``holov`` read the attention each patch *receives* in the last SigLIP
layer (as for PaliGemma, see ``adapters/paligemma.py``), ``vflowopt`` its attention from the "global" tokens there.

In-LLM stages (``fastv``, ``pdrop``, ``atp``, ``flowcut``'s LLM variant, ``vla_pruner``): the prefix pass runs the
shared ``llm:K`` machinery (started by the VLM pre-hook, ended by its forward hook), so VLM layers >= K compute and
cache only the kept entries — the keep decision is taken before those layers write the cache, so nothing needs
compacting afterwards. The action expert's layer i reads cache layer i: its layers >= K re-lay their block masks on
the kept entries like decode steps (``expert_layers``). ``vla_pruner`` records the expert's action queries'
attention over the cached image slots (``action_layers``, ``action_reducer``) at every denoising pass and closes the
control step when ``sample_actions`` returns. A training forward (``actions=``) with in-LLM stages is refused.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .. import call as calls
from ..call import Session, cache_of, cached_length, session_of
from ..config import PruneConfig, StageSpec
from ..kernels import gather_tokens
from ..probes import Capture, action_rows, global_importance, probe_name, received_attention
from ..report import ImageReport, PruneReport, prefill_flops
from ..selection import Offer, select
from ..selectors.base import SelectorSpec
from .base import Adapter, left_compact
from .paligemma import SIGNAL

#: HF model_type -> adapter class (read by vtprune.registry without importing this file)
FAMILIES = {"pi0": "PI0Adapter"}

#: the attribute of the open ``Call`` that holds a ``sample_actions`` call's pending prefix (``_Pending``)
_PENDING = "pi0_prefix"
#: probe reducers of the signals this family provides, read on the last SigLIP layer
_REDUCERS = {"cls_attention": received_attention, "vflow_importance": global_importance}


@dataclass
class _Pending:
    """What the VLM pre-hook of one ``sample_actions`` call needs and the VLM call does not carry."""

    input_ids: torch.Tensor
    cameras: torch.Tensor  # pixel_attention_mask [B, cameras]
    stage: StageSpec | None  # the pre_llm stage, None with in-LLM stages only
    spec: SelectorSpec | None
    config: PruneConfig
    captures: dict[str, Capture]  # the armed SigLIP probes of the signals the selector reads


class PI0Adapter(Adapter):
    #: a robot policy (``sample_actions`` / ``forward(actions=...)``, no ``generate``): tests/families.py routes
    #: families with this flag out of the text-generation test matrix
    policy = True
    #: the image token π0's processor puts ``tokens_per_image`` times per present camera, before ``<bos>``; a raw
    #: prompt is the task alone (the processor adds the image tokens, ``<bos>`` and the final ``\n``), so ``{img}``
    #: formats to "" there
    placeholder = "<image>"
    prompt = "{img}{q}"
    provides = ("cls_attention", "vflow_importance", "grid")
    encoder_keys = ("pixel_values",)

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.base = self.inner_model(("vlm", "dit", "embed_prefix"), "model.model",
                                     "PI0ForConditionalGeneration (transformers >= 5.24)")
        if not callable(getattr(model, "sample_actions", None)):
            raise ValueError(f"{type(model).__name__} has no sample_actions; vtprune supports "
                             "PI0ForConditionalGeneration (transformers >= 5.24)")

    # ---- family facts ---------------------------------------------------------------------------------------------
    def text_config(self) -> Any:
        return self.model.config.vlm_config.text_config

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.base.vlm.language_model.layers

    def tower_layers(self) -> torch.nn.ModuleList:
        tower = self.base.vlm.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def image_token_id(self) -> int:
        return int(self.model.config.vlm_config.image_token_id)

    def tokens_per_image(self) -> int:
        v = self.model.config.vlm_config.vision_config
        return (v.image_size // v.patch_size) ** 2

    def check_config(self, config: Any) -> None:
        # every camera has exactly tokens_per_image tokens, so a larger budget can only be a mistake (e.g. a
        # LLaVA budget reused): say so instead of silently keeping everything
        t = self.tokens_per_image()
        for s in config.stages:
            if s.keep is not None and s.keep > t:
                raise ValueError(f"keep={s.keep} exceeds the {t} SigLIP tokens per camera of this pi0 (its budget is "
                                 f"per camera); use keep <= {t} (keep={t} keeps every token) or keep_ratio=")

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cameras sit back to back in one run of image tokens: the r-th image token belongs to present camera
        r // tokens_per_image (the model's own mapping in ``embed_prefix``)."""
        is_img = input_ids == self.image_token_id()
        rank = is_img.long().cumsum(-1) - 1
        return (rank // self.tokens_per_image()).masked_fill(~is_img, -1)

    # ---- in-LLM stages: VLM layers >= K and the action expert's layers >= K see the kept prefix ---------------
    def text_attention(self) -> str:
        return self.base.vlm.config.text_config._attn_implementation

    def set_text_attention(self, name: str) -> None:
        self.base.vlm.set_attn_implementation({"text_config": name})

    def expert_layers(self) -> torch.nn.ModuleList:
        return self.base.dit.layers

    def action_layers(self) -> torch.nn.ModuleList:
        return self.base.dit.layers

    #: the action signal: the expert's action queries (the chunk; the state token left out) over the cached keys
    action_reducer = staticmethod(action_rows)

    def set_action_attention(self, name: str | None) -> str | None:
        current = self.base.dit.config._attn_implementation
        self.base.dit.set_attn_implementation(probe_name(current) if name == "probe" else name)
        return current

    # ---- install (the vision probe lives in the VLM's vision sub-config) ----------------------------------------
    def attach(self, needs: set[str], in_tower: bool = False) -> None:
        if needs & set(_REDUCERS):
            self._saved_impl = self.base.vlm.config.vision_config._attn_implementation
            self.base.vlm.set_attn_implementation({"vision_config": probe_name(self._saved_impl or "sdpa")})
        self._handles = [self.base.vlm.register_forward_pre_hook(self._vlm_pre, with_kwargs=True),
                         self.base.vlm.register_forward_hook(self._vlm_post),
                         self.base.register_forward_pre_hook(self._model_pre, with_kwargs=True),
                         self.base.dit.register_forward_pre_hook(self._dit_pre, with_kwargs=True)]
        # an instance-level sample_actions the caller set before prune() is wrapped and restored by detach
        self._saved_sample = self.model.__dict__.get("sample_actions")
        self.model.__dict__["sample_actions"] = _SampleActions(self.model)

    def detach(self) -> None:
        for h in self.__dict__.pop("_handles", ()):
            h.remove()
        if isinstance(self.model.__dict__.get("sample_actions"), _SampleActions):
            del self.model.__dict__["sample_actions"]
        saved = self.__dict__.pop("_saved_sample", None)
        if saved is not None:
            self.model.__dict__["sample_actions"] = saved
        if self._saved_impl is not None:
            vlm = self.base.vlm
            if vlm.config.vision_config._attn_implementation == probe_name(self._saved_impl):
                vlm.set_attn_implementation({"vision_config": self._saved_impl})
            self._saved_impl = None

    def arm(self, stack: contextlib.ExitStack, spec: SelectorSpec) -> dict[str, Capture]:
        """Arm the last SigLIP layer's probe for the signals ``spec`` reads, for the calls inside ``stack``."""
        attn = self.tower_layers()[-1].self_attn  # its output (post-norm) is what the projector reads
        return {name: stack.enter_context(self.capture(attn, fn)) for name, fn in _REDUCERS.items()
                if name in spec.requires + spec.optional}

    # ---- the training / single-pass forward: prefix built inside PI0Model.forward ---------------------------------
    def prune_call(self, kwargs: dict[str, Any], stage: StageSpec, spec: SelectorSpec, config: PruneConfig,
                   generate: bool) -> tuple[dict[str, Any], PruneReport] | None:
        if kwargs.get("pixel_values") is None or cached_length(kwargs) > 0:
            return None
        if kwargs.get("inputs_embeds") is not None or kwargs.get("input_ids") is None:
            raise ValueError("vtprune prunes pi0's prefix from input_ids, pixel_values and pixel_attention_mask (got "
                             "precomputed inputs_embeds, or no input_ids); pass those, or run this call inside "
                             "`with vtprune.disabled(model):`")
        ids, cams = kwargs["input_ids"], kwargs.get("pixel_attention_mask")
        self._check_layout(ids, cams, kwargs["pixel_values"])
        with contextlib.ExitStack() as stack:
            caps = self.arm(stack, spec)
            embeds = self.base.embed_prefix(ids, kwargs["pixel_values"], cams)
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None and pos is None:  # PI0Model.forward's own rule
            pos = mask.cumsum(-1) - 1
        res = self._prune(ids, cams, embeds, mask, pos, None, caps, stage, spec, config)
        if res is None:
            return None
        new_vlm, report = res
        new = {**kwargs, "input_ids": None, "inputs_embeds": new_vlm.get("inputs_embeds", embeds)}
        for k in ("attention_mask", "position_ids"):
            if new_vlm.get(k) is not None:
                new[k] = new_vlm[k]
        return new, report

    def session_info(self, kwargs: dict[str, Any], new: dict[str, Any], config: Any) -> dict[str, Any] | None:
        c = calls.current(self)
        return c.session.pre if c is not None and c.session is not None else None

    def decode_call(self, kwargs: dict[str, Any], info: dict[str, Any], cached: int) -> dict[str, Any] | None:
        return None  # the PI0Model pre-hook re-lays the mask of every call over a pruned prefix cache

    def continue_call(self, kwargs: dict[str, Any], info: dict[str, Any], cached: int) -> dict[str, Any]:
        raise ValueError("pi0 has no generate(); a pruned prefix cache is continued by sample_actions' own passes")

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def _vlm_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The prefix VLM call of ``sample_actions``: prune ``inputs_embeds`` and everything laid out with it."""
        c = calls.current(self)
        job: _Pending | None = getattr(c, _PENDING, None) if c is not None else None
        if job is None:
            return None
        setattr(c, _PENDING, None)  # one prefix per call: the denoising passes never run the VLM again
        from ..api import _bind

        kw = _bind(type(module).forward, args, kwargs, skip=1)
        embeds = kw.get("inputs_embeds")
        if embeds is None or cached_length(kw) > 0 or embeds.shape[:2] != job.input_ids.shape:
            # never run the prefix unpruned silently: sample_actions no longer builds it as this adapter expects
            raise RuntimeError(f"vtprune: the first VLM call of pi0's sample_actions did not get the prefix embeddings "
                               f"of its input_ids {tuple(job.input_ids.shape)} without a cache (transformers' PI0 "
                               "changed?); run it inside `with vtprune.disabled(model):`")
        new: dict[str, Any] = {}
        if job.stage is not None:
            res = self._prune(job.input_ids, job.cameras, embeds, kw.get("attention_mask"), kw.get("position_ids"),
                              kw.get("token_type_ids"), job.captures, job.stage, job.spec, job.config)
            if res is not None:
                new, c.report = res
        llm = self.model.__dict__["_vtprune_state"].llm
        if llm is not None:  # the in-LLM stages run on this prefix pass (its image rows come from input_ids)
            ids = job.input_ids
            if c.report is not None and c.report.token_map is not None and new:
                tm = c.report.token_map
                ids = ids.gather(1, tm.clamp(min=0)).masked_fill(tm < 0, -1)
            mask = new.get("attention_mask", kw.get("attention_mask"))
            llm.begin(c, {"input_ids": ids, "attention_mask": mask}, 0, None)
        return ((), {**kw, **new}) if new else None

    def _vlm_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        # the expert passes of this call read the cache right away: attach the session now, not at the call's end
        c = calls.current(self)
        llm = self.model.__dict__["_vtprune_state"].llm
        if c is not None and llm is not None and c.step is not None and c.step.phase == "prefill":
            llm.end(c)  # the kept sets of the prefix pass go into the session before the expert passes read them
        cache = calls.output_cache(output)
        if c is not None and c.session is not None and session_of(cache) is None:
            calls.attach_session(cache, c.session)

    def _model_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """An expert pass over a pruned prefix cache: the caller's 2-D mask (laid out on the unpruned prefix, as
        ``sample_actions`` passes it; or none) becomes the kept prefix's."""
        from ..api import _bind

        kw = _bind(type(module).forward, args, kwargs, skip=1)
        if kw.get("pixel_values") is not None and cache_of(kw) is None and \
                self.model.__dict__["_vtprune_state"].llm is not None:
            raise ValueError("in-LLM stages on pi0 prune the prefix of sample_actions; a forward that builds the "
                             "prefix itself (training with actions=...) is not supported with them: use a pre_llm "
                             "method for training, or run it inside `with vtprune.disabled(model):`")
        info = _info(cache_of(kw))
        if info is None:
            return None
        mask, orig = kw.get("attention_mask"), info["orig_mask"]
        if mask is None or (mask.shape == orig.shape and torch.equal(mask, orig.to(mask))):
            return (), {**kw, "attention_mask": info["mask"] if mask is None else info["mask"].to(mask)}
        if mask.dim() == 2 and mask.shape[1] == info["new_len"]:
            return None  # already laid out on the kept prefix
        raise ValueError(f"this pi0 prefix cache was pruned by vtprune; a pass over it takes the attention_mask the "
                         f"prefix was built with (shape {tuple(orig.shape)}) or one laid out on the kept prefix "
                         f"(length {info['new_len']}), got one of shape {tuple(mask.shape)}")

    def _dit_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """PI0Model counted the action tokens' positions over the kept prefix: shift them to the unpruned count."""
        info = _info(cache_of(kwargs))
        if info is None:
            return None
        pos = kwargs.get("position_ids")
        if pos is None:
            raise RuntimeError("vtprune: pi0's action expert got no position_ids over a pruned prefix cache")
        return args, {**kwargs, "position_ids": pos + info["shift"].to(pos)[:, None]}

    # ---- the shared prefix pruning ------------------------------------------------------------------------------
    def _check_layout(self, ids: torch.Tensor, cams: torch.Tensor | None, pixels: torch.Tensor | None) -> None:
        """π0's camera layout: pixel_values [B, cameras, 3, H, W], pixel_attention_mask [B, cameras], and exactly
        ``tokens_per_image`` image tokens in input_ids per present camera (the model maps the r-th image token to
        present camera r // tokens_per_image)."""
        if cams is None or cams.dim() != 2 or cams.shape[0] != ids.shape[0]:
            raise ValueError(f"pi0 needs pixel_attention_mask [batch, cameras] for input_ids of shape "
                             f"{tuple(ids.shape)}, got {None if cams is None else tuple(cams.shape)}")
        if pixels is not None and tuple(pixels.shape[:2]) != tuple(cams.shape):
            raise ValueError(f"pixel_values {tuple(pixels.shape)} must be [batch, cameras, 3, H, W] matching "
                             f"pixel_attention_mask {tuple(cams.shape)}")
        t = self.tokens_per_image()
        got = (ids == self.image_token_id()).sum(1)
        want = cams.bool().sum(1).to(got.device) * t
        bad = (got != want).nonzero().flatten().tolist()
        if bad:
            b = bad[0]
            raise ValueError(f"sample {b} has {int(got[b])} image tokens but {int(want[b]) // t} present cameras in "
                             f"pixel_attention_mask; pi0 needs {t} image tokens (tokens_per_image) per present "
                             f"camera, {int(want[b])} here. Build the inputs with the policy's processor")

    def _prune(self, ids: torch.Tensor, cams: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None,
               pos: torch.Tensor | None, types: torch.Tensor | None, caps: dict[str, Capture], stage: StageSpec,
               spec: SelectorSpec, config: PruneConfig) -> tuple[dict[str, torch.Tensor], PruneReport] | None:
        """Select per camera on the image rows of the prefix ``embeds`` [B, L, D] and drop the rest: the pruned
        VLM inputs (``inputs_embeds``, ``attention_mask``, ``position_ids``, ``token_type_ids`` if given) and the
        report; None without any present camera. Sets the call's cache ``Session`` when tokens were dropped."""
        b, length = ids.shape
        dev = embeds.device
        t, cams = self.tokens_per_image(), cams.bool()
        side = int(round(t ** 0.5))
        rows = {n: torch.cat(self.captured(cap)) for n, cap in caps.items()}  # [B * cameras, T] in camera order
        is_img = (ids == self.image_token_id()).to(dev)
        owner: list[tuple[int, int, torch.Tensor]] = []  # (sample, camera slot, its prefix positions)
        offers = []
        for s in range(b):
            pos_img = is_img[s].nonzero().flatten()
            for k, cam in enumerate(cams[s].nonzero().flatten().tolist()):
                where = pos_img[k * t:(k + 1) * t]
                owner.append((s, cam, where))
                offers.append(Offer(embeds[s, where], stage.budget(t), cam, grid=(side, side), signals={
                    n: r[s * cams.shape[1] + cam].to(dev) for n, r in rows.items()}))
        if not offers:
            return None
        choices = select(spec, stage.options, config.seed, offers)
        report = PruneReport(stage=stage.where, positions=config.positions)
        keep = torch.ones(b, length, dtype=torch.bool, device=dev)
        merged: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        src = SIGNAL.format(pool="") if rows.get("cls_attention") is not None else ""
        for (s, cam, where), ch in zip(owner, choices):
            drop = torch.ones(t, dtype=torch.bool, device=dev)
            drop[ch.index.to(dev)] = False
            keep[s, where[drop]] = False
            if ch.merged is not None:  # merged tokens sit at their anchor's slot and position
                merged.append((s, where[ch.index.to(dev)], ch.merged))
            report.images.append(ImageReport(sample=s, image=cam, kept=ch.index, n_before=t, method=spec.name,
                                             stage=stage.where, signal=src, grid=(side, side), _timer=ch.timer,
                                             _share=ch.share))
        full = mask if mask is not None else torch.ones(b, length, dtype=torch.long, device=dev)
        report.tokens_before = full.sum(1).tolist()
        d, m, n_layers = self.text_dims()
        if bool(keep.all()):  # nothing dropped: the call runs unchanged
            report.tokens_after = list(report.tokens_before)
            report.token_map = torch.arange(length, device=dev).expand(b, length)
            report.flops_before = report.flops_after = prefill_flops(report.tokens_before, d, m, n_layers)
            return {}, report
        if merged:
            embeds = embeds.clone()
            for s, where, toks in merged:
                embeds[s, where] = toks.to(embeds.dtype)
        token_map = left_compact(keep)
        idx, pad = token_map.clamp(min=0), token_map < 0

        def take(x: torch.Tensor) -> torch.Tensor:
            return x.gather(1, idx.to(x.device)).masked_fill(pad.to(x.device), 0)

        new_mask = take(full)
        if config.positions == "preserve":
            # the unpruned prefix's positions: given (sample_actions: the mask's cumsum - 1), else the VLM's own
            # 1-based arange (PaliGemmaModel.forward)
            orig = pos if pos is not None else torch.arange(1, length + 1, device=dev).expand(b, length)
            new_pos = take(orig)
            shift = full.sum(1) - new_mask.sum(1)  # attended prefix tokens dropped per row
        else:  # compact ablation: counted over the kept tokens, for the prefix and the action tokens alike
            new_pos = new_mask.long().cumsum(-1) - (1 if pos is not None else 0)
            shift = torch.zeros(b, dtype=torch.long, device=dev)
        new = {"inputs_embeds": gather_tokens(embeds, idx.to(dev)).masked_fill(pad[..., None], 0),
               "attention_mask": new_mask, "position_ids": new_pos}
        if types is not None:
            new["token_type_ids"] = take(types)
        report.token_map = token_map
        report.tokens_after = new_mask.sum(1).tolist()
        report.flops_before = prefill_flops(report.tokens_before, d, m, n_layers)
        report.flops_after = prefill_flops(report.tokens_after, d, m, n_layers)
        c = calls.current(self)
        if c is not None:
            # what every expert pass over this cache needs: the caller's prefix mask (to recognise it), the kept
            # prefix's mask and length, the dropped tokens per row (the action tokens' position shift)
            c.session = Session(pre={"pi0": True, "orig_mask": full, "mask": new_mask, "new_len": new_mask.shape[1],
                                     "shift": shift, "orig_ids": ids})
        return new, report


def _info(cache: Any) -> dict[str, Any] | None:
    session = session_of(cache)
    pre = session.pre if session is not None else None
    return pre if pre is not None and pre.get("pi0") else None


class _SampleActions:
    """``policy.sample_actions`` while pruned: open the call, record what the prefix VLM call needs, arm the probe,
    run the policy's own ``sample_actions``, keep the report. Holds nothing but the model; copies and pickles rebuild
    it around the copy (``__reduce__``), as ``api._Generate`` does."""

    __name__ = "sample_actions"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __reduce__(self) -> tuple:
        return (_SampleActions, (self.model,))

    @property
    def __wrapped__(self) -> Any:
        from ..api import _state

        state = _state(self.model)
        saved = state.adapter.__dict__.get("_saved_sample") if state is not None else None
        return saved if saved is not None else type(self.model).sample_actions.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:  # sample_actions' signature, for code that inspects it
        return inspect.signature(self.__wrapped__)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__wrapped__.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from .. import api

        inner = self.__wrapped__
        state = api._state(self.model)
        if state is None or not api._enabled(state) or (state.pre is None and state.llm is None):
            return inner(*args, **kwargs)
        kw = api._bind(inner, args, kwargs, skip=0)
        adapter: PI0Adapter = state.adapter
        ids, cams = kw.get("input_ids"), kw.get("pixel_attention_mask")
        if ids is None or kw.get("pixel_values") is None:
            return inner(**kw)  # the policy's own error
        adapter._check_layout(ids, cams, kw["pixel_values"])
        c = calls.open_call(adapter, "sample_actions")
        c.prefill = True
        try:
            with contextlib.ExitStack() as stack:
                stage, spec = state.pre if state.pre is not None else (None, None)
                caps = adapter.arm(stack, spec) if spec is not None else {}
                setattr(c, _PENDING, _Pending(ids, cams, stage, spec, state.config, caps))
                return inner(**kw)
        finally:
            if state.llm is not None and c.actions:  # one control step: its action attention goes to the episode
                details = state.llm.close_step(c)
                if c.report is not None and details:
                    c.report.details.update(details)
            state.local.report = c.report
            calls.close_call(c)


