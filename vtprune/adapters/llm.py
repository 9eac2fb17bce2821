"""In-LLM stages (``llm:K``), shared by every family that runs a transformers decoder-layer loop.

Prefill: a forward pre-hook on decoder layer K picks the visual tokens to keep (per image), gathers the hidden
states, rotary position embeddings (cos, sin), position ids and the attention mask, and every later layer gets the
compacted versions instead of the full-length ones the model's loop hands it. Layers ≥ K therefore compute and cache
only kept entries; layers < K keep the full KV. Positions are the kept tokens' own (preserve), so decoding continues
after the unpruned length.

Decode: each layer group attends over its own kept set: the mask the model builds for the full cache length is
re-laid on that group's cached columns (kept prompt tokens, then the generated tokens), with vtprune's padding
masked — batches with different kept counts per row stay exact.

Scores come from a probe on layer K−1's attention function (the last prompt token's row), never from an eager
language model or a re-run layer. Inside one ``generate`` call the kept sets are fixed at the first prefill (static
pruning, FastV's KV-cache semantics); with ``use_cache=False`` every step replays those sets, so generation with and
without the cache agree.

Family knowledge stays in the adapters: this module only needs ``adapter.decoder_layers()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..call import Session, current, repeat_rows
from ..config import PruneConfig, StageSpec
from ..kernels import gather_tokens
from ..probes import Capture, ProbeStop, flow_stats_over, last_flow_logits, last_row, probe_name, received_causal
from ..registry import get_selector
from ..report import ImageReport, PruneReport, prefill_flops
from ..selection import Offer, select
from .base import left_compact

#: selector signals an llm:K stage can provide, each read from layer K−1's attention call (last prompt token)
LLM_SIGNALS = {"text_attention": last_row, "flow_stats": last_flow_logits, "prefill_attention": received_causal}
#: per-image finishing of a captured row, once the image's positions are known (FlowCut normalises over them)
SIGNAL_OVER_IMAGE = {"flow_stats": flow_stats_over}
#: selector signals read from the stage layer K itself before it runs: its own input norm, q/k projections and RoPE
#: on the hidden states entering it (PyramidDrop), the last prompt token's row
STAGE_SIGNALS = {"layer_attention": last_row}
#: signals read from the episode's history (temporal selectors: VLA-Pruner's action attention)
EPISODE_SIGNALS = ("action_attention",)
#: every signal an llm:K stage provides, whatever the family
IN_LLM_SIGNALS = (*LLM_SIGNALS, *STAGE_SIGNALS, *EPISODE_SIGNALS)
SIGNAL_NAMES = {"text_attention": "text_attention(last prompt token", "prefill_attention": "prefill_attention("
                "every prompt token", "layer_attention": "layer_attention(last "
                "prompt token, the stage layer's own projections", "flow_stats": "flow_stats(last prompt token's "
                "query and value"}


@dataclass
class Run:
    """The in-LLM state of one forward of the language model (kept in the call's ``Call.step``).

    prefill: ``lp`` prompt length entering the LM, ``mask2d`` [B, lp], ``img`` [B, lp] image index per position
    (-1 text), ``cur`` [B, L_cur] LM-input positions of the current sequence (-1 = padding added by vtprune),
    ``stage_cur`` stage -> ``cur`` after that stage, ``sub`` the compacted layer kwargs, ``replay`` the first
    prefill's decisions (same generate call without a cache), ``captures`` armed probes, ``report``.
    decode: ``q`` new tokens, ``kv`` layer 0's key count, with ``lp`` / ``stage_cur`` from the cache's session.
    """

    phase: str
    lp: int = 0
    stage_cur: dict[int, torch.Tensor] = field(default_factory=dict)
    q: int = 0
    kv: int = 0
    mask2d: torch.Tensor | None = None
    img: torch.Tensor | None = None
    cur: torch.Tensor | None = None
    sub: dict[str, Any] | None = None
    replay: dict[int, torch.Tensor] | None = None
    replay_len: int = 0
    first_ids: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # the prompt as the language model saw it
    captures: dict[tuple[int, str], Capture] = field(default_factory=dict)
    report: PruneReport | None = None
    embeds: torch.Tensor | None = None  # [B, lp, D] the layer-0 input embeddings (selectors that ask for them)
    record: Capture | None = None  # the action-attention probe of a temporal stage (VLA-Pruner)


class LLMStages:
    """The ``llm:K`` stages of one pruned model: what prune() decided and the layer hooks; no per-call state."""

    def __init__(self, adapter: Any, config: PruneConfig):
        self.adapter = adapter
        self.seed = config.seed
        self.stages: list[tuple[StageSpec, Any]] = [(s, get_selector(s.method)) for s in config.stages
                                                     if s.layer is not None]
        self.layers = adapter.decoder_layers()
        self.expert = adapter.expert_layers()  # a policy's action expert reading the cache layer by layer (π0)
        self.stage_at = {s.layer: i for i, (s, _) in enumerate(self.stages)}
        # (layer, signal) pairs to capture: layer K-1 for every stage at K whose selector needs an LLM signal
        self.probes = sorted({(s.layer - 1, r) for s, spec in self.stages for r in spec.requires if r in LLM_SIGNALS})
        self.probe_layers = sorted({layer for layer, _ in self.probes})
        self.scores_own_layer = any(r in STAGE_SIGNALS for _, spec in self.stages for r in spec.requires)
        self.wants_embeddings = any(getattr(spec, "features", "hidden") == "embeddings" for _, spec in self.stages)
        # a temporal stage (VLA-Pruner) records each control step's action->vision attention at one layer
        self.temporal = next(((s, spec) for s, spec in self.stages if "action_attention" in spec.requires), None)
        self.record_layer = None
        self._saved_action_impl: str | None = None
        if self.temporal is not None:
            n = len(adapter.action_layers())
            r = self.temporal[0].options.get("record_layer")
            # the reference reads layer 15 of OpenVLA's 32: about half the depth
            self.record_layer = min(n - 1, round(15 / 32 * n)) if r is None else int(r)
            if not 0 <= self.record_layer < n:
                raise ValueError(f"vla_pruner record_layer={r} is outside the layers that decode actions "
                                 f"(0..{n - 1})")
        self.handles: list[Any] = []
        self._saved_impl: str | None = None

    # ---- install ------------------------------------------------------------------------------------------------
    def attach(self) -> None:
        text_cfg = self.adapter.text_config()
        types = getattr(text_cfg, "layer_types", None)
        if types and len(set(types)) > 1:
            raise ValueError(f"in-LLM stages need one attention type in every decoder layer; this model mixes "
                             f"{sorted(set(types))}")
        if self.scores_own_layer and not all(hasattr(self.layers[s.layer], "input_layernorm")
                                             for s, _ in self.stages):
            raise ValueError("scoring a stage with its own layer's projections needs decoder layers with an "
                             "input_layernorm (Llama / Qwen-style); this language model has none")
        if self.probe_layers or self.scores_own_layer or self.temporal is not None:
            self._saved_impl = self.adapter.text_attention()
            if self._saved_impl not in ("sdpa", "eager"):
                raise ValueError(f"in-LLM stages support language models on 'sdpa' or 'eager' attention, got "
                                 f"{self._saved_impl!r}; load the model with attn_implementation='sdpa'")
            self.adapter.set_text_attention(probe_name(self._saved_impl))
        if self.temporal is not None:  # an action expert of its own (π0) is probed too
            self._saved_action_impl = self.adapter.set_action_attention("probe")
        first = self.stages[0][0].layer
        if self.wants_embeddings:  # the layer-0 input embeddings of the prompt, for selectors that score on them
            self.handles.append(self.layers[0].register_forward_pre_hook(self._embeddings_hook, with_kwargs=True))
        for i in range(first, len(self.layers)):
            hook = functools.partial(self._layer_hook, i)
            self.handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        for i in range(first, len(self.expert) if self.expert is not None else 0):
            # expert layer i reads cache layer i: its passes over the prefix cache are decode steps of that group
            hook = functools.partial(self._layer_hook, i, expert=True)
            self.handles.append(self.expert[i].register_forward_pre_hook(hook, with_kwargs=True))
        # the family's own per-token inputs of layers >= first (Qwen3-VL's DeepStack) must follow the compaction
        self.handles.extend(self.adapter.llm_hooks(first))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self._saved_impl is not None:
            # a choice the user made after prune() (set_attn_implementation) is theirs: restore only our probe
            if self.adapter.text_attention() == probe_name(self._saved_impl):
                self.adapter.set_text_attention(self._saved_impl)
            self._saved_impl = None
        if self._saved_action_impl is not None:
            self.adapter.set_action_attention(self._saved_action_impl)
            self._saved_action_impl = None

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        if self._saved_impl is not None:  # unpickled in a new process: register the probe named in the config
            probe_name(self._saved_impl)

    # ---- one call -----------------------------------------------------------------------------------------------
    def begin(self, c: Any, kwargs: dict[str, Any], cached: int, session: Any) -> None:
        """Called before every forward with the kwargs the model will get (after the pre_llm stage)."""
        c.step = None
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if cached > 0:
            llm = session.llm if session is not None else None
            # a policy's action-expert pass (π0) carries no input_ids: its block mask is always given (4-D)
            q = input_ids.shape[1] if input_ids is not None else 0
            if llm is not None and (input_ids is not None or self.expert is not None):
                rows = next(iter(llm["stage_cur"].values())).shape[0]
                if input_ids is not None and rows != input_ids.shape[0]:
                    raise ValueError(f"this KV cache was filled by a pruned call of {rows} rows, but this call has "
                                     f"{input_ids.shape[0]}; continue a cache with the batch that filled it")
                c.step = Run("decode", lp=llm["lp"], stage_cur=llm["stage_cur"], q=q, kv=cached + q,
                             img=llm.get("img"))
                self._arm_record(c.step)
            return
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise ValueError("in-LLM stages need input_ids to find the image tokens (got inputs_embeds only); "
                                 "pass input_ids, or run this call inside `with vtprune.disabled(model):`")
            return
        if not bool((input_ids == self.adapter.image_token_id()).any()):
            return
        if self.temporal is not None and c.kind not in ("generate", "sample_actions"):
            raise ValueError(f"{self.temporal[1].name} keeps the tokens a control step's actions attend to, which it "
                             "learns from the actions each step decodes: call model.generate(...) (a policy that "
                             "emits action tokens) or policy.sample_actions(...), not a bare forward")
        b, length = input_ids.shape
        run = Run("prefill", lp=length, ids=input_ids, mask2d=attention_mask if attention_mask is not None
                  else torch.ones_like(input_ids), img=self._image_index(c, input_ids),
                  cur=torch.arange(length, device=input_ids.device).expand(b, length))
        first = c.llm_replay
        if c.kind == "generate":
            if first is None:
                run.first_ids = input_ids
            elif input_ids.shape[1] >= first["ids"].shape[1] and input_ids.shape[0] == first["ids"].shape[0] \
                    and torch.equal(input_ids[:, : first["ids"].shape[1]], first["ids"]):
                run.replay = first["stage_cur"]  # same generate call, no cache: reuse the first decisions
                run.replay_len = first["ids"].shape[1]
        for layer, r in self.probes:
            cap = Capture(self.layers[layer].self_attn, LLM_SIGNALS[r])
            cap.__enter__()
            run.captures[(layer, r)] = cap
        if run.replay is not None:  # no cache: this prefill re-runs the prompt plus the action tokens so far
            self._arm_record(run)
        c.step = run
        if run.replay is not None:
            return  # a replayed step reports nothing new; the call keeps the first prefill's report
        if c.report is None:
            c.report = PruneReport(stage="", positions="preserve")
        names = [c.report.stage] + [s.where for s, _ in self.stages]
        c.report.stage = "+".join(dict.fromkeys(n for n in names if n))
        run.report = c.report

    def _image_index(self, c: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] image of every position (-1 text). After a pre_llm stage that dropped tokens it is read on the
        caller's unpruned prompt and carried through that stage's token map: an image spanning several placeholder
        runs (Idefics3 tiles) may have lost whole runs, and with them what tells its images apart."""
        pre = c.session.pre if c.session is not None else None
        if pre is None or c.report is None or c.report.token_map is None or c.llm_replay is not None:
            return self.adapter.image_index(input_ids)  # the prompt as the caller gave it (or a replayed step)
        rows, dev = input_ids.shape[0], input_ids.device
        tm = repeat_rows(c.report.token_map, rows).to(dev)  # generate's beams repeat each sample in place
        img = self.adapter.image_index(repeat_rows(pre["orig_ids"], rows).to(dev))
        img = img.gather(1, tm.clamp(min=0)).masked_fill(tm < 0, -1)
        return torch.nn.functional.pad(img, (0, input_ids.shape[1] - img.shape[1]), value=-1)

    def end(self, c: Any) -> None:
        """Called after every forward: disarm probes, finish the report of a prefill, hand its kept sets on."""
        run, c.step = c.step, None
        if run is None:
            return
        if run.record is not None:
            run.record.__exit__(None, None, None)
            self._record(c, run)
        for cap in reversed(list(run.captures.values())):  # probes nest: disarm in reverse order
            cap.__exit__(None, None, None)
        if run.phase != "prefill" or run.replay is not None:
            return
        if run.first_ids is not None:
            c.llm_replay = {"ids": run.first_ids, "stage_cur": dict(run.stage_cur)}
        if run.stage_cur:
            if c.session is None:
                c.session = Session()
            c.session.llm = {"lp": run.lp, "stage_cur": dict(run.stage_cur), "ids": run.ids, "img": run.img}
        self._finish_report(run)

    # ---- layer hooks --------------------------------------------------------------------------------------------
    def _layer_hook(self, i: int, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                    expert: bool = False):
        c = current(self.adapter)
        run = c.step if c is not None else None
        if run is None or (expert and run.phase != "decode"):  # the expert never takes part in the prefix pass
            return None
        if run.phase == "decode":
            s = max((k for k in run.stage_cur if self.stages[k][0].layer <= i), default=None)
            if s is None:
                return None
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._decode_mask(run, s, kwargs.get("attention_mask"))
            return args, kwargs
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self.stage_at:
            # after an earlier stage the loop's full-length kwargs are stale: prune from the current ones
            now = {**kwargs, **run.sub} if run.sub is not None else kwargs
            hidden = self._prune(run, self.stage_at[i], hidden, now)
        if run.sub is None:
            return None
        kwargs = {**kwargs, **run.sub}
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prune(self, run: Run, s: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        stage, spec = self.stages[s]
        cur = run.cur
        b = cur.shape[0]
        if run.replay is not None and s in run.replay:
            stored = run.replay[s]
            first_len = run.replay_len
            extra = torch.arange(run.lp - first_len, device=cur.device)
            target = torch.cat([stored, (first_len + extra).expand(b, -1)], 1)
            # where each target position sits in the current sequence
            inv = torch.full((b, run.lp + 1), -1, dtype=torch.long, device=cur.device)
            inv.scatter_(1, cur.masked_fill(cur < 0, run.lp), torch.arange(cur.shape[1], device=cur.device)
                         .expand(b, -1).contiguous())
            src = inv.gather(1, target.masked_fill(target < 0, run.lp)).masked_fill(target < 0, -1)
        else:
            src = self._select(run, s, stage, spec, hidden, kwargs)
        pad = src < 0
        idx = src.clamp(min=0)
        new_cur = cur.gather(1, idx).masked_fill(pad, -1)
        run.stage_cur[s] = new_cur
        run.cur = new_cur
        cos, sin = kwargs["position_embeddings"]
        sub: dict[str, Any] = {"position_embeddings": (self._rows(cos, idx), self._rows(sin, idx))}
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            sub["position_ids"] = pos.expand(*pos.shape[:-2], b, pos.shape[-1]).gather(
                -1, idx.expand(*pos.shape[:-2], *idx.shape))
        sub["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), src)
        run.sub = sub
        return gather_tokens(hidden, idx)

    def _own_layer_row(self, layer: int, reducer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """``reducer``'s row from decoder layer ``layer``'s attention run on the hidden states entering it: its input
        norm, q/k/v projections and rotary embedding (the model's own code, whatever the family), stopped at the
        attention function. No cache is passed, so nothing is written to the KV cache."""
        dec = self.layers[layer]
        cap = Capture(dec.self_attn, reducer, stop=True)
        with torch.no_grad(), cap:
            try:
                dec.self_attn(hidden_states=dec.input_layernorm(hidden), attention_mask=kwargs.get("attention_mask"),
                              position_embeddings=kwargs["position_embeddings"],
                              position_ids=kwargs.get("position_ids"))
            except ProbeStop:
                pass
        if not cap.results:
            raise RuntimeError("vtprune: the language-model attention probe did not fire; the attention "
                               "implementation was changed after prune — unprune and prune again")
        return cap.results[-1]

    def _select(self, run: Run, s: int, stage: StageSpec, spec: Any, hidden: torch.Tensor,
                kwargs: dict[str, Any]) -> torch.Tensor:
        """Kept positions of the current sequence after stage s (text and the caller's padding always kept)."""
        cur, b = run.cur, run.cur.shape[0]
        valid = cur >= 0
        img = run.img.gather(1, cur.clamp(min=0)).masked_fill(~valid, -1)
        keep = valid & (img < 0)
        rows: dict[str, torch.Tensor] = {r: self._own_layer_row(stage.layer, STAGE_SIGNALS[r], hidden, kwargs)
                                         for r in spec.requires if r in STAGE_SIGNALS}
        for r in (r for r in spec.requires if r in LLM_SIGNALS):
            res = run.captures[(stage.layer - 1, r)].results
            if not res:
                raise RuntimeError("vtprune: the language-model attention probe did not fire; the attention "
                                   "implementation was changed after prune — unprune and prune again")
            rows[r] = res[-1]  # [B, L_cur] or [B, C, L_cur]: from the last prompt token in layer K-1
        episode = self._episode() if "action_attention" in spec.requires else None
        where, offers, warm = [], [], []
        for bi in range(b):
            for j in range(int(img[bi].max()) + 1):
                pos = (img[bi] == j).nonzero().flatten()
                signals = {}
                for r, row in rows.items():
                    signals[r] = row[bi][..., pos]
                    if r in SIGNAL_OVER_IMAGE:
                        signals[r] = SIGNAL_OVER_IMAGE[r](signals[r])
                budget = stage.budget(pos.numel(), of=int((run.img[bi] == j).sum()))
                if episode is not None:
                    estimate = self._action_estimate(episode, stage, bi, j, run, run.cur[bi][pos])
                    warm.append(estimate is None)
                    if estimate is None:  # warm-up: the first steps of an episode run unpruned (and record)
                        budget = pos.numel()
                        estimate = torch.zeros(pos.numel(), device=hidden.device)
                    signals["action_attention"] = estimate
                feats = run.embeds[bi, run.cur[bi][pos]] if getattr(spec, "features", "hidden") == "embeddings" \
                    else hidden[bi, pos]
                where.append((bi, j, pos))
                offers.append(Offer(feats, budget, j, signals))
        choices = select(spec, stage.options, self.seed, offers)
        for (bi, _, pos), ch in zip(where, choices):
            keep[bi, pos[ch.index]] = True
        self._stage_entries(run, stage, spec, img, keep, where, choices)
        if episode is not None and run.report is not None:  # per control step: warm-up, kept per criterion
            from ..selectors.vla_pruner import criterion_counts

            steps = run.report.details.setdefault("vla_pruner", [])
            for (bi, j, _), o, ch, w in zip(where, offers, choices, warm):
                counts = [0, 0, 0] if w else criterion_counts(
                    ch.index[None], o.signals["prefill_attention"][None], o.signals["action_attention"][None],
                    o.keep)[0].tolist()
                steps.append({"sample": bi, "image": j, "warmup": w, "kept": int(ch.index.numel()),
                              "semantic_only": counts[0], "action_only": counts[1], "both": counts[2]})
        return left_compact(keep)

    # ---- temporal stages (VLA-Pruner) -----------------------------------------------------------------------------
    def _episode(self) -> Any:
        from ..episode import active

        return active(self.adapter, self.adapter.model.__dict__["_vtprune_state"].local)

    def _action_estimate(self, episode: Any, stage: StageSpec, row: int, image: int, run: Run,
                         positions: torch.Tensor) -> torch.Tensor | None:
        """The temporal estimate of the action attention over the image's current tokens (LM-input ``positions``),
        or None while the row's episode has fewer than ``window`` recorded steps (warm-up)."""
        from ..selectors.vla_pruner import temporal_estimate

        window = int(stage.options.get("window", 3))
        hist = episode.history(row, image, window)
        if len(hist) < window:
            return None
        est = temporal_estimate([h[None].to(positions.device) for h in hist], float(stage.options.get("gamma", 0.8)),
                                stage.options.get("weighting", "paper"))[0]
        first = (run.img[row] == image).nonzero().flatten()  # the image's LM-input positions: its slot order
        return est[torch.searchsorted(first, positions)]

    def _arm_record(self, run: Run) -> None:
        if self.record_layer is not None:
            run.record = Capture(self.adapter.action_layers()[self.record_layer].self_attn,
                                 self.adapter.action_reducer)
            run.record.__enter__()

    def _record(self, c: Any, run: Run) -> None:
        """Add this forward's action token (the last query at the record layer) to the call's action attention:
        head-mean attention over the image slots, slots the stages dropped counting 0 (the reference's scatter)."""
        if not run.record.results or run.img is None:
            return
        att = run.record.results[-1].float()  # [B, keys] of the newest token
        r = self.record_layer
        s = max((k for k in run.stage_cur if self.stages[k][0].layer <= r), default=None)
        b = att.shape[0]
        keys = run.stage_cur[s] if s is not None else torch.arange(run.lp, device=att.device).expand(b, -1)
        # one scatter per forward (a control step of π0 records every denoising pass): the attention each cached
        # slot got lands on its prompt position; close_step splits the mean into images
        dense = torch.zeros(b, run.img.shape[1], device=att.device)
        dense.scatter_add_(1, keys.clamp(min=0), att[:, : keys.shape[1]] * (keys >= 0))
        if c.actions is None:
            c.actions = (dense, 1, run.img)
            return
        total, count, img = c.actions
        if img.shape[1] < run.img.shape[1]:  # use_cache=False: each step re-runs a longer sequence; the images stay
            total = torch.nn.functional.pad(total, (0, run.img.shape[1] - img.shape[1]))
            img = run.img
        c.actions = (total + torch.nn.functional.pad(dense, (0, total.shape[1] - dense.shape[1])), count + 1, img)

    def close_step(self, c: Any) -> dict[str, Any] | None:
        """End of a control step (a ``generate`` call): its mean action attention goes into the episode."""
        if self.temporal is None or not c.actions:
            return None
        episode, window = self._episode(), int(self.temporal[0].options.get("window", 3))
        total, count, img = c.actions
        mean, img = (total / count).cpu(), img.cpu()
        rows = {bi: {j: mean[bi][img[bi] == j] for j in range(int(img[bi].max()) + 1)} for bi in range(img.shape[0])}
        rows = {bi: v for bi, v in rows.items() if v}
        for bi, vectors in rows.items():
            episode.record(bi, vectors, window)
        return {"recorded_steps": [episode.steps(bi) for bi in sorted(rows)]}

    def _embeddings_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        c = current(self.adapter)
        run = c.step if c is not None else None
        if run is not None and run.phase == "prefill":
            run.embeds = (args[0] if args else kwargs["hidden_states"]).detach()

    @staticmethod
    def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Gather sequence rows of a [B or 1, L, d] tensor (cos/sin)."""
        t = t.expand(idx.shape[0], *t.shape[1:])
        return gather_tokens(t, idx)

    def _prefill_mask(self, mask: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor | None:
        pad = src < 0
        idx = src.clamp(min=0)
        b, n = src.shape
        if mask is None:
            if not bool(pad.any()):
                return None  # still plain causal over the kept order
            allowed = torch.ones(n, n, dtype=torch.bool, device=src.device).tril()[None, None]
            mask = self._model_mask(allowed & ~pad[:, None, None, :])
        elif mask.dim() == 4:
            m = mask.expand(b, *mask.shape[1:])
            m = m.gather(2, idx[:, None, :, None].expand(b, m.shape[1], n, m.shape[3]))
            mask = m.gather(3, idx[:, None, None, :].expand(b, m.shape[1], n, n))
            mask = self._mask_fill(mask, pad[:, None, None, :])
        elif mask.dim() == 2:
            return mask.gather(1, idx).masked_fill(pad, 0)
        else:
            raise ValueError(f"in-LLM stages cannot re-lay an attention mask of shape {tuple(mask.shape)}")
        # rows of added padding attend to themselves only, so no row is empty (empty rows give NaN)
        eye = torch.eye(n, dtype=torch.bool, device=src.device)[None, None] & pad[:, None, :, None]
        return self._mask_fill(mask, eye, allow=True)

    def _model_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean "may attend" mask in the form the model's attention takes (eager adds float masks)."""
        impl = self.adapter.text_config()._attn_implementation
        if impl.endswith("eager"):
            zeros = torch.zeros(allowed.shape, device=allowed.device)
            return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)
        return allowed

    @staticmethod
    def _mask_fill(mask: torch.Tensor, where: torch.Tensor, allow: bool = False) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return mask.masked_fill(where, allow)
        return mask.masked_fill(where, 0.0 if allow else torch.finfo(mask.dtype).min)

    def _decode_mask(self, run: Run, s: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        cur = run.stage_cur[s]
        pad = cur < 0
        b = cur.shape[0]
        lp = run.lp
        if mask is None:
            if not bool(pad.any()):
                return None
            # the model saw no padding and skipped its mask, but this group's rows were re-padded by vtprune
            q, new = run.q, run.kv - lp
            r = torch.arange(q, device=cur.device)[:, None]
            causal_new = torch.arange(new, device=cur.device)[None, :] <= (new - q + r)
            full = torch.cat([(~pad)[:, None, :].expand(b, q, -1), causal_new[None].expand(b, -1, -1)], 2)
            return self._model_mask(full[:, None])
        if mask.dim() == 2:
            return torch.cat([mask.gather(1, cur.clamp(min=0)).masked_fill(pad, 0), mask[:, lp:]], 1)
        kv = mask.shape[-1]
        cols = torch.cat([cur.clamp(min=0), torch.arange(lp, kv, device=cur.device).expand(b, -1)], 1)
        m = mask.expand(b, *mask.shape[1:])
        m = m.gather(3, cols[:, None, None, :].expand(b, m.shape[1], m.shape[2], cols.shape[1]))
        hole = torch.cat([pad, torch.zeros(b, kv - lp, dtype=torch.bool, device=cur.device)], 1)
        return self._mask_fill(m, hole[:, None, None, :])

    # ---- report -------------------------------------------------------------------------------------------------
    def _stage_entries(self, run: Run, stage: StageSpec, spec: Any, img: torch.Tensor, keep: torch.Tensor,
                       where: list[tuple[int, int, torch.Tensor]], choices: list[Any]) -> None:
        signal = ", ".join(f"{SIGNAL_NAMES[r]}, layer {stage.layer - (r in LLM_SIGNALS)})" for r in spec.requires
                           if r in LLM_SIGNALS or r in STAGE_SIGNALS)
        for (bi, j, _), ch in zip(where, choices):
            first_pos = (run.img[bi] == j).nonzero().flatten()
            here = img[bi] == j
            kept_lm = run.cur[bi][here & keep[bi]]  # LM-input positions kept
            run.report.images.append(ImageReport(
                sample=bi, image=j, kept=torch.searchsorted(first_pos, kept_lm), n_before=int(here.sum()),
                method=spec.name, stage=stage.where, signal=signal, _timer=ch.timer, _share=ch.share))

    def _finish_report(self, run: Run) -> None:
        rep = run.report
        n_layers = len(self.layers)
        b = run.img.shape[0]
        vis_in = (run.img >= 0).sum(1)
        real_in = run.mask2d.sum(1)
        counts = torch.zeros(b, n_layers, dtype=torch.long)
        tokens = torch.zeros(b, n_layers, dtype=torch.long)
        counts[:] = vis_in[:, None].cpu()
        tokens[:] = real_in[:, None].cpu()
        for s, (stage, _) in enumerate(self.stages):
            cur = run.stage_cur.get(s)
            if cur is None:
                continue
            valid = cur >= 0
            vis = (run.img.gather(1, cur.clamp(min=0)) >= 0) & valid
            real = run.mask2d.gather(1, cur.clamp(min=0)).bool() & valid
            counts[:, stage.layer:] = vis.sum(1)[:, None].cpu()
            tokens[:, stage.layer:] = real.sum(1)[:, None].cpu()
        rep.layer_visual_tokens = counts
        rep.avg_visual_per_layer = counts.float().mean(1).tolist()
        # the pre_llm map has a row per sample; generate's beams / return sequences repeat each sample in place
        tm = repeat_rows(rep.token_map, b) if rep.token_map is not None else torch.arange(run.lp).expand(b, -1)
        rep.token_map = tm.gather(1, run.cur.clamp(min=0)).masked_fill(run.cur < 0, -1)
        d, m, _ = self.adapter.text_dims()
        rep.flops_after = sum(prefill_flops(tokens[:, layer].tolist(), d, m, 1) for layer in range(n_layers))
        if not rep.tokens_before:
            rep.tokens_before = real_in.tolist()
            rep.flops_before = prefill_flops(rep.tokens_before, d, m, n_layers)
        rep.tokens_after = tokens[:, -1].tolist()
