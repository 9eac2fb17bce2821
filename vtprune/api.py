"""The public calls: prune, unprune, is_pruned, disabled, last_report, select_tokens."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters.base import cached_length
from .config import PruneConfig
from .registry import get_adapter_class, get_selector
from .report import PruneReport

_STATE = "_vtprune_state"


@dataclass
class _State:
    config: PruneConfig
    adapter: Any
    pre: tuple | None = None  # (StageSpec, SelectorSpec) of the pre_llm stage
    llm: Any = None  # LLMStages of the llm:K stages
    handles: list = field(default_factory=list)
    saved_generate: Any = None
    had_generate: bool = False
    enabled: bool = True
    report: PruneReport | None = None
    decode: dict | None = None  # bookkeeping of the last pruned forward prefill, for manual decode loops
    pending: PruneReport | None = None  # pre_llm report of a generate call, completed by its in-LLM stages


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
    adapter_cls = get_adapter_class(_model_type(model))
    if is_pruned(model):
        raise ValueError("model is already pruned; call vtprune.unprune(model) first (or use vtprune.disabled(model) "
                         "to run it unpruned)")
    adapter = adapter_cls(model)
    config = config.resolved(len(adapter.decoder_layers()), vision_stage=adapter.vision_stage)
    state = _State(config=config, adapter=adapter)
    if config.stages[0].before_llm:
        spec = get_selector(config.stages[0].method)
        adapter.check_method(spec)
        state.pre = (config.stages[0], spec)
    if any(s.layer is not None for s in config.stages):
        from .adapters.llm import LLMStages

        state.llm = LLMStages(adapter, config)
    try:
        if state.pre is not None:
            adapter.attach(set(state.pre[1].requires) | set(state.pre[1].optional))
        if state.llm is not None:
            state.llm.attach()
        state.handles.append(model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True))
        state.handles.append(model.register_forward_hook(_forward_hook, always_call=True))
        state.had_generate = "generate" in model.__dict__
        state.saved_generate = model.__dict__.get("generate")
        if hasattr(model, "generate"):
            model.generate = _wrap_generate(model, model.generate)
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
    """Run ``model`` unpruned inside the block (A/B in one process), pruned again afterwards."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune; disabled() needs a pruned model")
    prev, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = prev


def last_report(model: torch.nn.Module) -> PruneReport | None:
    """Report of the last pruned call (None before the first call with images)."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not pruned by vtprune; call vtprune.prune(model, ...) first")
    return state.report


def select_tokens(method: str, features: torch.Tensor, keep: int, **signals: Any) -> torch.Tensor:
    """Run one selector standalone: ``features[B, N, D]`` -> kept indices ``LongTensor[B, keep]``, ascending."""
    spec = get_selector(method)
    return spec.fn(features, keep, **signals)


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


def _forward_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
    state = _state(module)
    if state is None or not state.enabled:
        return None
    kw = _bind(type(module).forward, args, kwargs, skip=1)
    cached = cached_length(kw)
    new = None
    if cached > 0:
        # a decode step of the caller's own loop after a pruned prefill (generate keeps its own positions)
        new = state.adapter.decode_call(kw, state.decode, cached) if state.decode is not None else None
    else:
        state.decode = None
        res = None
        if state.pre is not None:
            res = state.adapter.prune_call(kw, state.pre[0], state.pre[1], state.config, generate=False)
        if res is not None:
            new, state.report = res
            state.decode = state.adapter.decode_info(kw, new, state.config)
    if state.llm is not None:
        final = new if new is not None else kw
        if cached == 0 and final.get("labels") is not None and final.get("pixel_values", final.get(
                "mm_encoder_outputs")) is not None:
            raise ValueError("labels are not supported with in-LLM stages (logits cover only the kept tokens); "
                             "use a pre_llm stage for training-style forwards")
        base = state.report if new is not None else state.pending
        report = state.llm.begin(final.get("input_ids"), final.get("attention_mask"), cached,
                                 base if cached == 0 else None)
        if cached == 0 and report is not None:
            state.report, state.pending = report, None
    return None if new is None else ((), new)


def _forward_hook(module: torch.nn.Module, args: tuple, *rest: Any) -> None:
    state = _state(module)
    if state is not None and state.llm is not None:
        state.llm.end()


def _wrap_generate(model: torch.nn.Module, generate: Any) -> Any:
    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = _state(model)
        if state is None or not state.enabled:
            return generate(*args, **kwargs)
        state.decode = None
        kw = _bind(generate, args, kwargs, skip=0)
        if "inputs" in kw and "input_ids" not in kw:
            kw["input_ids"] = kw.pop("inputs")
        res = None
        if state.pre is not None:
            res = state.adapter.prune_call(kw, state.pre[0], state.pre[1], state.config, generate=True)
        if state.llm is not None:
            state.llm.session = {}  # in-LLM decisions are fixed by this call's first prefill
        try:
            if res is None:
                return generate(**kw)
            new_kwargs, state.report = res
            state.pending = state.report
            out = generate(**new_kwargs)
        finally:
            state.pending = None
            if state.llm is not None:
                state.llm.session = None
        # hand back the caller's own prompt followed by the new tokens, so out[:, L_in:] keeps working
        prompt, pruned_len = kw["input_ids"], new_kwargs["input_ids"].shape[1]
        seq = out.sequences if hasattr(out, "sequences") else out
        full = torch.cat([prompt.to(seq.device), seq[:, pruned_len:]], dim=1)
        if hasattr(out, "sequences"):
            out.sequences = full
            return out
        return full

    return wrapper
