"""The public calls: prune, unprune, is_pruned, disabled, episode, reset, last_report, select_tokens."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import call as calls
from . import episode as _episode
from .call import Session, cache_of, cached_length, repeat_rows, session_of
from .config import PruneConfig
from .registry import get_adapter_class, get_selector, run_selector
from .report import PruneReport

_STATE = "_vtprune_state"

# ids of the adapters (one per pruned model) that `disabled()` switched off in the running context only
_DISABLED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("vtprune_disabled", default=frozenset())


@dataclass
class _State:
    """What ``prune()`` decided for one model; nothing about any single call (that lives in ``call.Call``)."""

    config: PruneConfig
    adapter: Any
    pre: tuple | None = None  # (StageSpec, SelectorSpec) of the pre_llm stage
    llm: Any = None  # LLMStages of the llm:K stages
    handles: list = field(default_factory=list)
    saved_generate: Any = None
    had_generate: bool = False
    #: per thread: .report = the report of this thread's latest call (see last_report)
    local: threading.local = field(default_factory=threading.local)

    def __getstate__(self) -> dict[str, Any]:
        # a copy or pickle of a pruned model starts without reports (thread-locals are neither copyable nor shared)
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.local = threading.local()


def _model_type(model: Any) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if not isinstance(model, torch.nn.Module) or mt is None:
        raise ValueError(f"prune() needs a transformers model with a .config.model_type, got {type(model).__name__}")
    return mt


def prune(model: torch.nn.Module, config: PruneConfig | dict | None = None, *, method: str | None = None,
          keep: int | None = None, keep_ratio: float | None = None, layer: int | None = None,
          stages: list[dict] | None = None, positions: str = "preserve", seed: int = 0,
          **options: Any) -> torch.nn.Module:
    """Prune the visual tokens of ``model`` in place and return the same object.

    Either a ``PruneConfig`` (or its dict form), the shorthand ``method=..., keep=...`` (``layer=K`` for a stage
    inside the language model, plus selector options), or ``stages=[{...}, ...]`` to compose stages (a stage without
    ``layer`` is ``pre_llm``). Raises ``ValueError`` naming the bad value and the valid choices; on error the model
    is left untouched.
    """
    shorthand = method is not None or keep is not None or keep_ratio is not None or layer is not None or options
    if (config is not None) + (stages is not None) + bool(shorthand) > 1:
        raise ValueError("give one of: a PruneConfig, stages=[...], or method=/keep=/... keywords")
    if stages is not None:
        config = PruneConfig.from_dict({"stages": stages, "positions": positions, "seed": seed})
    elif config is None:
        if method is None:
            raise ValueError("prune() needs method=<name> (one of: " + ", ".join(_methods()) + ") or a PruneConfig")
        config = PruneConfig.single(method, keep, keep_ratio, positions, seed, layer, **options)
    elif isinstance(config, dict):
        config = PruneConfig.from_dict(config)
    elif not isinstance(config, PruneConfig):
        raise ValueError(f"config must be a PruneConfig or a dict, got {type(config).__name__}")
    config.validate()
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper: hooks on it would never see the compiled calls
        raise ValueError("prune() got a torch.compile()d model; prune the model first, then compile it: "
                         "vtprune.prune(model, ...); model = torch.compile(model) (or pass model._orig_mod)")
    adapter_cls = get_adapter_class(_model_type(model))
    if is_pruned(model):
        raise ValueError("model is already pruned; call vtprune.unprune(model) first (or use vtprune.disabled(model) "
                         "to run it unpruned)")
    adapter = adapter_cls(model)
    config = config.resolved(len(adapter.decoder_layers()), vision_stage=adapter.vision_stage)
    adapter.check_config(config)
    state = _State(config=config, adapter=adapter)
    if config.stages[0].before_llm:
        spec = get_selector(config.stages[0].method)
        adapter.check_method(spec)
        state.pre = (config.stages[0], spec)
    if any(s.layer is not None for s in config.stages):
        from .adapters.llm import LLMStages

        state.llm = LLMStages(adapter, config)
    try:
        # always: a family may hook its own entry points even without a pre_llm stage (π0's sample_actions)
        needs = set(state.pre[1].requires) | set(state.pre[1].optional) if state.pre is not None else set()
        adapter.attach(needs, in_tower=state.pre is not None and state.pre[0].where == "vision")
        if state.llm is not None:
            state.llm.attach()
        state.handles.append(model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True))
        state.handles.append(model.register_forward_hook(_forward_hook, always_call=True))
        inner = adapter.inner_module()
        if inner is not None:
            state.handles.append(inner.register_forward_pre_hook(functools.partial(_inner_guard, model),
                                                                 with_kwargs=True))
        state.had_generate = "generate" in model.__dict__
        state.saved_generate = model.__dict__.get("generate")
        if hasattr(model, "generate"):
            model.generate = _Generate(model)
        setattr(model, _STATE, state)
    except Exception:
        _teardown(model, state)
        raise
    return model


def _methods() -> list[str]:
    from .registry import list_methods

    return list_methods()


def _state(model: torch.nn.Module) -> _State | None:
    return model.__dict__.get(_STATE)


def is_pruned(model: torch.nn.Module) -> bool:
    """True while ``model`` carries vtprune's hooks."""
    return _state(model) is not None


def _teardown(model: torch.nn.Module, state: _State) -> None:
    for h in state.handles:
        h.remove()
    if "generate" in model.__dict__:
        del model.__dict__["generate"]
    if state.had_generate:
        model.__dict__["generate"] = state.saved_generate
    state.adapter.detach()
    if state.llm is not None:
        state.llm.detach()
    model.__dict__.pop(_STATE, None)


def unprune(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every hook and attribute vtprune added; the model behaves bit-identically to before ``prune``."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune (nothing to undo)")
    _teardown(model, state)
    return model


@contextlib.contextmanager
def disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` unpruned inside the block (A/B in one process), pruned again afterwards.

    Only calls in this thread (this context) run unpruned; other threads using the model keep pruning."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune; disabled() needs a pruned model")
    token = _DISABLED.set(_DISABLED.get() | {id(state.adapter)})
    try:
        yield model
    finally:
        _DISABLED.reset(token)


def _enabled(state: _State) -> bool:
    return id(state.adapter) not in _DISABLED.get()


@contextlib.contextmanager
def episode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A robot episode: calls inside the block share a fresh history for temporal selectors (``vla_pruner``),
    separate from other threads and blocks; it is dropped when the block ends."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune; episode() needs a pruned model")
    with _episode.opened(state.adapter):
        yield model


def reset(model: torch.nn.Module, rows: list[int] | None = None) -> None:
    """Start a new episode for temporal selectors (``vla_pruner``): clear the active history (that of the enclosing
    ``episode()`` block, else the calling thread's). ``rows=[i, ...]``: only those batch rows (vectorised
    environments that started a new episode while the others go on)."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune; call vtprune.prune(model, ...) first")
    if rows is not None and (not isinstance(rows, (list, tuple)) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows)):
        raise ValueError(f"rows must be a list of batch row indices (ints >= 0), got {rows!r}")
    _episode.active(state.adapter, state.local).reset(None if rows is None else list(rows))


def last_report(model: torch.nn.Module) -> PruneReport | None:
    """Report of this thread's latest call of ``model``: ``None`` if that call pruned nothing (no images, nothing to
    drop). Decode steps continuing a pruned prefill keep the prefill's report; calls inside ``disabled()`` are not
    vtprune's and leave it as it was. Per thread: a thread never sees another thread's report."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune; call vtprune.prune(model, ...) first")
    return getattr(state.local, "report", None)


def select_tokens(method: str, features: torch.Tensor, keep: int, **signals: Any) -> torch.Tensor:
    """Run one selector standalone: ``features[B, N, D]`` -> kept indices ``LongTensor[B, keep]``, ascending.

    Selection is not differentiable: it runs without autograd, on detached inputs. Merging selectors (vflowopt)
    return their kept indices here; the merged tokens come with a pruned model's forward."""
    spec = get_selector(method)
    sel = run_selector(spec, features, keep, **signals)
    return sel[0] if isinstance(sel, tuple) else sel


# ---- hooks -------------------------------------------------------------------------------------------------------
def _bind(fn: Any, args: tuple, kwargs: dict[str, Any], skip: int) -> dict[str, Any]:
    """Positional arguments -> keywords, by the wrapped function's own signature."""
    if not args:
        return dict(kwargs)
    names = [p.name for p in list(inspect.signature(fn).parameters.values())[skip:]
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments for {getattr(fn, '__name__', fn)}")
    out = dict(zip(names, args))
    dup = set(out) & set(kwargs)
    if dup:
        raise TypeError(f"got multiple values for argument(s) {sorted(dup)}")
    out.update(kwargs)
    return out


def _has_images(kw: dict[str, Any]) -> bool:
    enc = kw.get("mm_encoder_outputs")
    return kw.get("pixel_values") is not None or (isinstance(enc, dict) and enc.get("image") is not None)


def _image_tokens(state: _State, ids: torch.Tensor | None) -> int:
    return int((ids == state.adapter.image_token_id()).sum()) if ids is not None else 0


def _check_continuation(state: _State, kw: dict[str, Any], cached: int) -> None:
    """A call that continues a non-empty KV cache may not bring images: vtprune prunes images at the prefill that
    starts a cache, and silently running them unpruned would break "the model sees only kept tokens"."""
    n = _image_tokens(state, kw.get("input_ids"))
    if n:
        raise ValueError(
            f"this call continues a KV cache of {cached} tokens and brings an image ({n} image tokens in its "
            "uncached input_ids); vtprune prunes images in the prefill "
            "that starts a cache. Pass the whole conversation with past_key_values=None (vtprune then prunes every "
            "image in it), or run this call inside `with vtprune.disabled(model):` to keep the new image unpruned")


def _inner_guard(owner: torch.nn.Module, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """The inner model called without vtprune's outer hooks (``model.forward(...)``, ``model.model(...)``): say so
    instead of silently running the images unpruned."""
    state = _state(owner)
    if state is None or not _enabled(state) or calls.current(state.adapter) is not None:
        return None
    kw = _bind(type(module).forward, args, kwargs, skip=1)
    if _has_images(kw) and cached_length(kw) == 0:
        raise ValueError("vtprune prunes through the model's own call: use model(...) or model.generate(...). "
                         "model.forward(...), model.model(...) and type(model).generate(model, ...) bypass the "
                         "pruning hooks; run such calls inside `with vtprune.disabled(model):` to mean unpruned")
    return None


def _forward_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
    state = _state(module)
    if state is None or not _enabled(state):
        return None
    c = calls.current(state.adapter)
    if c is None:
        c = calls.open_call(state.adapter, "forward")  # closed by _forward_hook, which runs even on errors
    kw = _bind(type(module).forward, args, kwargs, skip=1)
    cached = cached_length(kw)
    session = session_of(cache_of(kw))
    new = None
    if cached > 0:
        if not c.rewritten:
            _check_continuation(state, kw, cached)
            if session is not None and session.pre is not None:
                # a decode step of the caller's own loop after a pruned prefill (generate keeps its own positions)
                new = state.adapter.decode_call(kw, session.pre, cached)
    else:
        c.prefill = True
        if c.rewritten:
            new = _with_mask(kw)
        elif state.pre is not None:
            if kw.get("pixel_values") is None and _has_images(kw):
                raise ValueError(
                    "this call carries precomputed image features (mm_encoder_outputs) and no pixel_values: vtprune "
                    "needs pixel_values to score and select tokens. type(model).generate(model, ...) does this "
                    "(it bypasses vtprune's model.generate); call model.generate(...) or model(...) with "
                    "pixel_values, or run the call inside `with vtprune.disabled(model):` to mean unpruned")
            res = state.adapter.prune_call(kw, state.pre[0], state.pre[1], state.config, generate=False)
            if res is not None:
                new, c.report = res
                info = state.adapter.session_info(kw, new, state.config)
                if info is not None:
                    c.session = Session(pre=info)
    if state.llm is not None:
        final = new if new is not None else kw
        if cached == 0 and final.get("labels") is not None and _has_images(final):
            raise ValueError("labels are not supported with in-LLM stages (logits cover only the kept tokens); "
                             "use a pre_llm stage for training-style forwards")
        state.llm.begin(c, final, cached, session)
    return None if new is None else ((), new)


def _with_mask(kw: dict[str, Any]) -> dict[str, Any] | None:
    """A pruned prompt with preserved positions has gaps in its position ids. Without a cache and a mask (generate
    drops an all-ones mask; use_cache=False drops the cache) transformers reads every gap as the start of a new
    packed sequence (``find_packed_sequence_indices``) and splits the attention: hand it an explicit mask."""
    ids = kw.get("input_ids")
    if kw.get("attention_mask") is not None or kw.get("position_ids") is None or ids is None:
        return None
    return {**kw, "attention_mask": torch.ones_like(ids)}


def _forward_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
    state = _state(module)
    if state is None:
        return
    c = calls.current(state.adapter)
    if c is None:
        return
    try:
        if state.llm is not None:
            state.llm.end(c)
        if output is not None and c.session is not None:
            calls.attach_session(calls.output_cache(output), c.session)
    finally:
        if c.kind == "forward":
            if c.prefill:
                state.local.report = c.report
            calls.close_call(c)


class _Generate:
    """``model.generate`` while the model is pruned: prune the prompt once, then run the model's own ``generate``.

    It holds nothing but the model, and copies and pickles rebuild it around the copy (``__reduce__``), so
    ``copy.deepcopy(pruned).generate`` runs the copy, never the original object.
    """

    __name__ = "generate"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __reduce__(self) -> tuple:
        return (_Generate, (self.model,))

    @property
    def __wrapped__(self) -> Any:
        state = _state(self.model)
        if state is not None and state.had_generate:
            return state.saved_generate
        return type(self.model).generate.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:  # generate's signature, for code that inspects it
        return inspect.signature(self.__wrapped__)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__wrapped__.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model, inner = self.model, self.__wrapped__
        state = _state(model)
        if state is None or not _enabled(state):
            return inner(*args, **kwargs)
        kw = _bind(inner, args, kwargs, skip=0)
        if "inputs" in kw and "input_ids" not in kw:
            kw["input_ids"] = kw.pop("inputs")
        c = calls.open_call(state.adapter, "generate")
        c.prefill = True
        try:
            # generate is inference: the vision tower and the selection run without autograd too
            with torch.no_grad():
                new = _prepare_generate(state, c, kw)
                out = inner(**(new if new is not None else kw))
            if new is not None and new["input_ids"] is not kw.get("input_ids"):
                out = _restore_prompt(out, kw["input_ids"], new["input_ids"].shape[1])
            return out
        finally:
            if state.llm is not None and c.actions:
                details = state.llm.close_step(c)
                if c.report is not None and details:
                    c.report.details.update(details)
            state.local.report = c.report
            calls.close_call(c)


def _prepare_generate(state: _State, c: calls.Call, kw: dict[str, Any]) -> dict[str, Any] | None:
    """The kwargs generate runs with: the pruned prompt, a continuation of a pruned cache, or None (unchanged)."""
    cached = cached_length(kw)
    if cached > 0:
        session = session_of(cache_of(kw))
        if session is not None and session.pre is not None:
            new = state.adapter.continue_call(kw, session.pre, cached)
            c.rewritten = True
            c.report = PruneReport(stage=state.config.stages[0].where, positions=state.config.positions,
                                   note=f"continued a KV cache pruned by an earlier call ({cached} cached tokens); "
                                        "no new image in this call")
            return new
        ids = kw.get("input_ids")
        llm = session.llm if session is not None else None
        if llm is not None and ids is not None and ids.shape[1] > cached:
            first = llm["ids"]
            if ids.shape[0] != first.shape[0] or ids.shape[1] < first.shape[1] \
                    or not torch.equal(ids[:, : first.shape[1]], first.to(ids.device)):
                raise ValueError(
                    f"this past_key_values was filled by a pruned call whose prompt had shape {tuple(first.shape)}; "
                    "vtprune continues it only when input_ids is the whole conversation so far (that prompt, then "
                    f"every token after it), as transformers expects, got input_ids of shape {tuple(ids.shape)}. "
                    "Start a new cache (past_key_values=None) for another prompt")
        if ids is not None and ids.shape[1] > cached:  # generate gets the whole sequence and feeds what is uncached
            ids = ids[:, cached:]
        _check_continuation(state, {"input_ids": ids}, cached)
        if any(kw.get(k) is not None for k in state.adapter.encoder_keys):
            # the images are all in the cache: re-encoding them would only make the model fail on zero image tokens
            return {k: v for k, v in kw.items() if k not in state.adapter.encoder_keys}
        return None
    if state.pre is None:
        return None
    res = state.adapter.prune_call(kw, state.pre[0], state.pre[1], state.config, generate=True)
    if res is None:
        return None
    new, c.report = res
    c.rewritten = True
    info = state.adapter.session_info(kw, new, state.config)
    if info is not None:
        c.session = Session(pre=info)
    return new


def _restore_prompt(out: Any, prompt: torch.Tensor, pruned_len: int) -> Any:
    """Hand back the caller's own prompt followed by the new tokens, so ``out[:, L_in:]`` keeps working (with
    several return sequences or beams each prompt row is repeated, as generate repeats it)."""
    seq = out.sequences if hasattr(out, "sequences") else out
    full = torch.cat([repeat_rows(prompt.to(seq.device), seq.shape[0]), seq[:, pruned_len:]], dim=1)
    if hasattr(out, "sequences"):
        out.sequences = full
        return out
    return full
