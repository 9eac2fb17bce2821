"""Selectors by name and adapters by Hugging Face ``model_type``; modules are imported on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .selectors.base import SelectorSpec

# name -> "module:attribute" of a SelectorSpec
_SELECTORS: dict[str, str] = {
    "fastervlm": "vtprune.selectors.fastervlm:SPEC",
    "divprune": "vtprune.selectors.divprune:SPEC",
    "random": "vtprune.selectors.random:SPEC",
    "uniform": "vtprune.selectors.uniform:SPEC",
    "fastv": "vtprune.selectors.fastv:SPEC",
    "pdrop": "vtprune.selectors.pdrop:SPEC",
    "atp": "vtprune.selectors.atp:SPEC",
    "vflowopt": "vtprune.selectors.vflowopt:SPEC",
    "flowcut": "vtprune.selectors.flowcut:SPEC",
    "holov": "vtprune.selectors.holov:SPEC",
    "globalcom2": "vtprune.selectors.globalcom2:SPEC",
}

# HF model_type -> "module:attribute" of an adapter class
_ADAPTERS: dict[str, str] = {
    "llava": "vtprune.adapters.llava:LlavaAdapter",
    "llava_next": "vtprune.adapters.llava:LlavaNextAdapter",
    "qwen2_vl": "vtprune.adapters.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "vtprune.adapters.qwen2_vl:Qwen2VLAdapter",
    "internvl": "vtprune.adapters.internvl:InternVLAdapter",
}


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def list_methods() -> list[str]:
    """Names accepted by ``prune(method=...)`` and ``select_tokens``."""
    return sorted(_SELECTORS)


def supported_models() -> list[str]:
    """Hugging Face ``model_type`` values that have an adapter."""
    return sorted(_ADAPTERS)


def get_selector(name: str) -> SelectorSpec:
    if not isinstance(name, str) or name not in _SELECTORS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(list_methods())}")
    return _load(_SELECTORS[name])


def get_adapter_class(model_type: str) -> type:
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"unsupported model family {model_type!r}; supported model_type values: {', '.join(supported_models())}"
        )
    return _load(_ADAPTERS[model_type])


def register_selector(name: str, path: str) -> None:
    """Add a selector (``"package.module:SPEC"``) so third-party methods plug in without editing vtprune."""
    _SELECTORS[name] = path


def run_selector(spec: SelectorSpec, features: Any, keep: int, **signals: Any) -> Any:
    """Call a selector the way every caller must: scoring never records autograd history.

    Signals are detached. Inference (no grad, or features that need none) runs entirely under ``no_grad``. In a
    grad-enabled forward (fine-tuning with pruning) the live features go in: every selector scores on detached
    copies itself, and a merging selector (vflowopt) builds its summary tokens from the live features, so they stay
    differentiable, as the gathered kept features do.
    """
    import torch

    signals = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in signals.items()}
    if torch.is_grad_enabled() and isinstance(features, torch.Tensor) and features.requires_grad:
        return spec.fn(features, keep, **signals)
    with torch.no_grad():
        return spec.fn(features.detach() if isinstance(features, torch.Tensor) else features, keep, **signals)
