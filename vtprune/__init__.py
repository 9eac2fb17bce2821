"""vtprune: visual-token pruning for unmodified Hugging Face vision-language models.

    import vtprune
    vtprune.prune(model, method="divprune", keep=64)   # in place; returns the same model
    out = model.generate(**inputs)                      # unchanged user code
    print(vtprune.last_report(model))

    model, processor = vtprune.demo_model("llava")      # the shipped, project-trained demo model (offline)
    policy, processor = vtprune.demo_policy()           # the shipped Meta-World robot policy (π0, offline)

Importing vtprune imports no triton, no transformers model code and touches no CUDA.
"""

from .api import disabled, episode, is_pruned, last_report, prune, reset, select_tokens, unprune
from .config import PruneConfig, StageSpec
from .demo_models import demo_model, demo_policy
from .registry import list_methods, register_selector, supported_models

__all__ = [
    "PruneConfig",
    "StageSpec",
    "demo_model",
    "demo_policy",
    "disabled",
    "episode",
    "is_pruned",
    "last_report",
    "list_methods",
    "prune",
    "register_selector",
    "reset",
    "select_tokens",
    "supported_models",
    "unprune",
]
__version__ = "0.1.0"
