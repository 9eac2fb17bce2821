"""Per-call state: everything one ``forward`` / ``generate`` call of a pruned model decides lives in a ``Call``.

A ``Call`` is opened by the outermost vtprune hook (the ``generate`` override, or the forward pre-hook of a bare
forward) and closed when that call returns or raises. It is found through a ``contextvars.ContextVar``, so two
threads running one pruned model each see only their own call: nothing per call is stored on the model, on adapter
objects or in module globals. What must outlive one call — the bookkeeping a later decode step needs — travels with
the KV cache the call filled (``Session``, attached to that cache object), so it follows the cache wherever the
caller takes it (another call, a ``deepcopy``, another thread).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

import torch

from .report import PruneReport

# id(adapter) -> the Call open for that pruned model in this context (adapters are per pruned model)
_CALLS: contextvars.ContextVar[dict[int, Call] | None] = contextvars.ContextVar("vtprune_calls", default=None)

#: attribute a pruned prefill leaves on the KV cache object it filled
SESSION_ATTR = "_vtprune_session"


@dataclass
class Session:
    """What a KV cache filled by a pruned prefill holds, for the calls that continue it.

    ``pre``: the pre_llm rewrite (``orig_ids`` [B, L] the caller's prompt, ``pruned_ids`` / ``mask`` [B, L'] what the
    language model consumed, ``positions`` the pruned prompt's position ids, ``next_pos`` [B] the position after the
    unpruned prompt, or None with compacted positions); ``llm``: the in-LLM stages' kept sets (``lp``: prompt length
    entering the LM, ``stage_cur``: stage -> [B, L_s] kept positions, -1 = padding added by vtprune).
    """

    pre: dict[str, Any] | None = None
    llm: dict[str, Any] | None = None


@dataclass
class Call:
    """One outermost call of a pruned model (see module doc)."""

    adapter: Any
    kind: str  # "generate" or "forward": which hook opened it (and closes it)
    rewritten: bool = False  # the generate override already pruned this call's prompt
    report: PruneReport | None = None
    prefill: bool = False  # a prefill ran in this call (its report, possibly None, becomes last_report)
    llm_replay: dict[str, Any] | None = None  # in-LLM decisions of this generate call, replayed without a cache
    step: Any = None  # the running forward's in-LLM state (adapters.llm.Run)
    session: Session | None = None  # to attach to the cache this call's prefill filled
    actions: dict | None = None  # (row, image) -> (sum, count) of the action attention this call recorded
    _token: Any = None


def current(adapter: Any) -> Call | None:
    """The call open for this pruned model in the running context, if any."""
    calls = _CALLS.get()
    return calls.get(id(adapter)) if calls else None


def open_call(adapter: Any, kind: str) -> Call:
    """Open a call (copy-on-write map, so a context copied mid-call never shares a later call's state)."""
    c = Call(adapter=adapter, kind=kind)
    calls = dict(_CALLS.get() or {})
    calls[id(adapter)] = c
    c._token = _CALLS.set(calls)
    return c


def close_call(c: Call) -> None:
    _CALLS.reset(c._token)
    c._token = None


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache of a call. transformers 5.24 renamed the argument ``past_key_values`` to ``cache`` (the old
    name is deprecated until 5.40): accept both."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def output_cache(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        try:
            c = out[name] if isinstance(out, dict) else getattr(out, name, None)
        except (KeyError, AttributeError):
            c = None
        if c is not None:
            return c
    return None


def cached_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache of a forward call (0 for a prefill)."""
    cache = cache_of(kwargs)
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def session_of(cache: Any) -> Session | None:
    return getattr(cache, SESSION_ATTR, None) if cache is not None else None


def attach_session(cache: Any, session: Session) -> None:
    if cache is not None and (session.pre is not None or session.llm is not None):
        try:
            setattr(cache, SESSION_ATTR, session)
        except AttributeError:  # a cache type without instance attributes cannot carry it: decode steps then raise
            pass


def repeat_rows(t: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """Expand per-sample rows to ``rows`` (generate's beams / return sequences repeat each sample in place)."""
    if t.shape[dim] == rows:
        return t
    if rows % t.shape[dim]:
        raise ValueError(f"vtprune: {rows} rows cannot come from {t.shape[dim]} samples")
    return t.repeat_interleave(rows // t.shape[dim], dim=dim)
