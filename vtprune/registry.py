"""Selectors by name and adapters by Hugging Face ``model_type``; modules are imported on first use."""

from __future__ import annotations

import ast
import functools
import importlib
import pathlib
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
    "vla_pruner": "vtprune.selectors.vla_pruner:SPEC",
}

# HF model_type -> "module:attribute" of an adapter class registered at run time (register_adapter)
_EXTRA_ADAPTERS: dict[str, str] = {}


@functools.cache
def _family_files() -> dict[str, str]:
    """HF model_type -> "module:Class", read from every family file in ``vtprune/adapters``.

    A family file declares ``FAMILIES = {"<model_type>": "<AdapterClass>", ...}`` at module level. The literal is
    read from the source (``ast``), not imported, so ``import vtprune`` stays free of transformers model code and a
    new family is one new file, with no list to edit anywhere else.
    """
    out: dict[str, str] = {}
    folder = pathlib.Path(__file__).with_name("adapters")
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FAMILIES"
                                                   for t in node.targets):
                for model_type, cls in ast.literal_eval(node.value).items():
                    out[model_type] = f"vtprune.adapters.{path.stem}:{cls}"
    return out


def _adapters() -> dict[str, str]:
    return {**_family_files(), **_EXTRA_ADAPTERS}


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def list_methods() -> list[str]:
    """Names accepted by ``prune(method=...)`` and ``select_tokens``."""
    return sorted(_SELECTORS)


def supported_models() -> list[str]:
    """Hugging Face ``model_type`` values that have an adapter."""
    return sorted(_adapters())


def get_selector(name: str) -> SelectorSpec:
    if not isinstance(name, str) or name not in _SELECTORS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(list_methods())}")
    return _load(_SELECTORS[name])


def get_adapter_class(model_type: str) -> type:
    table = _adapters()
    if model_type not in table:
        raise ValueError(
            f"unsupported model family {model_type!r}; supported model_type values: {', '.join(supported_models())}"
        )
    return _load(table[model_type])


def register_adapter(model_type: str, path: str) -> None:
    """Add an adapter class (``"package.module:Class"``) for a Hugging Face ``model_type`` kept outside vtprune."""
    _EXTRA_ADAPTERS[model_type] = path


def methods_for(provides: tuple[str, ...] | set[str]) -> list[str]:
    """Methods whose required signals are all in ``provides`` (an adapter's signals, plus the in-LLM ones)."""
    from .adapters.llm import IN_LLM_SIGNALS

    have = set(provides) | set(IN_LLM_SIGNALS)
    return [m for m in list_methods() if set(get_selector(m).requires) <= have]


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
