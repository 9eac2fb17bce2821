"""PruneConfig: what to prune, where and how much. Validated eagerly so a bad config never touches a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

POSITIONS = ("preserve", "compact")
STAGES = ("vision", "pre_llm", "llm:K")
#: ``seed`` is valid in [0, SEED_LIMIT): adapters seed image ``j`` of a sample with ``seed * 1_000_003 + j`` in an
#: int64 tensor, which must not overflow (2**32 * 1_000_003 < 2**52, far inside int64 for any image count).
SEED_LIMIT = 2**32


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class StageSpec:
    """One pruning stage.

    ``keep``: visual tokens per image that leave the stage (an int ≥ 1; images with fewer tokens keep all).
    ``keep_ratio``: alternative, fraction in (0, 1] of each image's tokens (rounded, at least 1).
    ``layer``: ``None`` for the ``pre_llm`` stage (after the projector, before LLM layer 0).
    ``options``: selector options (validated against the selector's declared options).
    """

    method: str
    keep: int | None = None
    keep_ratio: float | None = None
    layer: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        if self.layer is not None:
            return f"llm:{self.layer}"
        from .registry import get_selector

        stages = get_selector(self.method).stages
        return "pre_llm" if "pre_llm" in stages else "vision" if "vision" in stages else "llm:auto"

    @property
    def before_llm(self) -> bool:
        """pre_llm and vision stages fill the one slot before the language model."""
        return self.where in ("pre_llm", "vision")

    def validate(self) -> None:
        from .registry import get_selector

        spec = get_selector(self.method)  # raises on unknown method, naming the choices
        if spec.schedule and self.layer is None and (self.keep is not None or self.keep_ratio is not None):
            raise ValueError(f"method {self.method!r} takes its budgets from schedule=[(layer, keep_ratio), ...] "
                             f"(default {spec.schedule} as (fraction of depth, ratio)); got keep={self.keep!r}, "
                             f"keep_ratio={self.keep_ratio!r}")
        if self.keep is None and self.keep_ratio is None and not (spec.schedule and self.layer is None):
            raise ValueError(f"stage {self.method!r}: give keep=<int> (tokens per image) or "
                             "keep_ratio=<float in (0, 1]>")
        if self.keep is not None and self.keep_ratio is not None:
            raise ValueError(
                f"stage {self.method!r}: give keep or keep_ratio, not both (got keep={self.keep!r}, "
                f"keep_ratio={self.keep_ratio!r})"
            )
        if self.keep is not None and (not _is_int(self.keep) or self.keep < 1):
            raise ValueError(f"keep must be an int ≥ 1 (visual tokens per image), got {self.keep!r}")
        if self.keep_ratio is not None:
            ok = isinstance(self.keep_ratio, (int, float)) and not isinstance(self.keep_ratio, bool)
            if not ok or not 0.0 < float(self.keep_ratio) <= 1.0:
                raise ValueError(f"keep_ratio must be a float in (0, 1], got {self.keep_ratio!r}")
        if self.layer is not None and (not _is_int(self.layer) or self.layer < 1):
            raise ValueError(f"layer must be an int ≥ 1 (the decoder layer from which only kept tokens are seen), got "
                             f"{self.layer!r}")
        kind = self.where if self.before_llm else "llm"
        if kind not in spec.stages:
            raise ValueError(f"method {self.method!r} cannot run at stage {self.where!r}; it supports "
                             f"{', '.join('llm:K' if s == 'llm' else s for s in spec.stages)}")
        unknown = sorted(set(self.options) - set(spec.options))
        if unknown:
            valid = ", ".join(sorted(spec.options)) or "none"
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.method!r}; valid options: {valid}; "
                "common arguments: keep, keep_ratio, positions, seed"
            )
        if self.layer is not None and self.options.get("schedule") is not None:
            raise ValueError(f"method {self.method!r}: give schedule=[(layer, keep_ratio), ...] or layer=K with "
                             f"keep/keep_ratio, not both (got layer={self.layer!r}, "
                             f"schedule={self.options['schedule']!r})")
        if spec.check_options is not None:
            spec.check_options(dict(self.options))

    def budget(self, n: int, of: int | None = None) -> int:
        """Tokens this stage keeps out of ``n`` present; ``keep_ratio`` applies to ``of`` (the image's tokens
        entering the language model, default ``n``), so multi-stage ratios refer to the original count."""
        k = self.keep if self.keep is not None else max(1, round(float(self.keep_ratio) * (n if of is None else of)))
        return min(int(k), n)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method}
        for k in ("keep", "keep_ratio", "layer"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d.update(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageSpec:
        if not isinstance(d, dict) or "method" not in d:
            raise ValueError(f"a stage must be a dict with at least a 'method' key, got {d!r}")
        d = dict(d)
        base = {k: d.pop(k) for k in ("method", "keep", "keep_ratio", "layer") if k in d}
        opts = d.pop("options", {})
        return cls(**base, options={**opts, **d})


def expand_schedule(method: str, fractions: tuple[tuple[float, float], ...] | list[tuple[float, float]],
                    n_layers: int) -> list[tuple[int, float]]:
    """A default schedule of ``(fraction of depth, keep ratio)`` pairs as ``(layer, keep ratio)`` for ``n_layers``.

    Each boundary goes to ``round(fraction * n_layers)`` clamped into the valid stage layers ``1..n_layers-1`` (a
    stage at layer K needs layers ``0..K-1`` before it and at least layer K after it). On a shallow model several
    boundaries can land on one layer; they merge into one stage with the later (smaller) ratio, so the schedule still
    ends at its final budget: ``pdrop`` on 3 layers gives ``[(1, 0.5), (2, 0.125)]``, on 2 layers ``[(1, 0.125)]``,
    on 32 layers ``[(8, 0.5), (16, 0.25), (24, 0.125)]``. Needs ``n_layers >= 2`` (else ValueError).
    """
    if n_layers < 2:
        raise ValueError(f"method {method!r} runs inside the language model (stages at layers 1..n_layers-1), which "
                         f"needs at least 2 decoder layers; this one has {n_layers}")
    out: list[tuple[int, float]] = []
    for frac, ratio in fractions:
        layer = min(max(1, round(frac * n_layers)), n_layers - 1)
        if out and out[-1][0] == layer:
            out[-1] = (layer, float(ratio))
        else:
            out.append((layer, float(ratio)))
    return out


@dataclass
class PruneConfig:
    """Everything ``vtprune.prune`` needs; JSON round-trips through ``to_dict``/``from_dict``.

    ``positions``: ``"preserve"`` (default: kept tokens keep the position ids of the unpruned prompt, decoding
    continues after the unpruned length) or ``"compact"`` (re-indexed 0..L'-1; an ablation).
    ``seed``: for stochastic selectors, an int in [0, 2**32); per image the seed is combined with the image's index
    in its sample (``seed * 1_000_003 + index``, an int64).
    """

    stages: list[StageSpec]
    positions: str = "preserve"
    seed: int = 0

    def validate(self) -> PruneConfig:
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError(f"stages must be a non-empty list of stage specs, got {self.stages!r}")
        for s in self.stages:
            if not isinstance(s, StageSpec):
                raise ValueError(f"each stage must be a StageSpec (or a dict via PruneConfig.from_dict), got {s!r}")
            s.validate()
        if sum(s.before_llm for s in self.stages) > 1:
            raise ValueError("at most one stage before the language model (pre_llm or vision: a stage without "
                             "`layer`) is allowed")
        if not self.stages[0].before_llm and any(s.before_llm for s in self.stages):
            raise ValueError("the pre_llm stage must come first in stages")
        layers = [s.layer for s in self.stages if s.layer is not None]
        if layers != sorted(set(layers)):
            raise ValueError(f"llm stages must have strictly increasing layers, got {layers}")
        if self.positions != "preserve" and any(not s.before_llm for s in self.stages):
            raise ValueError("positions='compact' applies to the pre_llm stage only; in-LLM stages keep positions "
                             "(use positions='preserve')")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**32) (per image it becomes seed * 1_000_003 + image index "
                             f"in an int64), got {self.seed!r}")
        return self

    @classmethod
    def single(cls, method: str, keep: int | None = None, keep_ratio: float | None = None,
               positions: str = "preserve", seed: int = 0, layer: int | None = None, **options: Any) -> PruneConfig:
        return cls([StageSpec(method, keep, keep_ratio, layer, options=options)], positions, seed)

    def resolved(self, n_layers: int, vision_stage: bool = True) -> PruneConfig:
        """Concrete stages for a language model of ``n_layers`` decoder layers: an llm-only method without ``layer``
        gets its default layer (FastV: 2) or its multi-stage schedule (PyramidDrop, ATP; see
        :func:`expand_schedule` for how a default schedule scales to the depth). ``vision_stage=False`` (the family's
        tower cannot be pruned inside): a vision-stage method that also runs in the LLM (FlowCut) moves to its default
        LLM layer. An explicit ``schedule`` is used as given; a layer past the model's last one raises."""
        from .registry import get_selector

        out: list[StageSpec] = []
        for s in self.stages:
            spec = get_selector(s.method)
            if s.where == "vision" and not vision_stage and "llm" in spec.stages:
                out.append(StageSpec(s.method, s.keep, s.keep_ratio, spec.default_layer, options=dict(s.options)))
            elif s.where != "llm:auto":
                out.append(s)
            elif spec.schedule:
                opts = {k: v for k, v in s.options.items() if k != "schedule"}
                given = s.options.get("schedule")
                sched = expand_schedule(s.method, spec.schedule, n_layers) if given is None else given
                for layer, ratio in sched:
                    out.append(StageSpec(s.method, None, float(ratio), int(layer), options=dict(opts)))
            else:
                out.append(StageSpec(s.method, s.keep, s.keep_ratio, spec.default_layer, options=dict(s.options)))
        for s in out:
            if s.layer is not None and s.layer >= n_layers:
                raise ValueError(f"stage llm:{s.layer} is past the last decoder layer (the language model has "
                                 f"{n_layers} layers: valid layers 1..{n_layers - 1})")
        return PruneConfig(out, self.positions, self.seed).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "positions": self.positions, "seed": self.seed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        """Accepts ``{"stages": [...], "positions": ..., "seed": ...}`` or the one-stage shorthand
        ``{"method": "divprune", "keep": 64, ...}``."""
        if not isinstance(d, dict):
            raise ValueError(f"PruneConfig.from_dict needs a dict, got {type(d).__name__}")
        d = dict(d)
        positions = d.pop("positions", "preserve")
        seed = d.pop("seed", 0)
        if "stages" in d:
            stages = d.pop("stages")
            if d:
                raise ValueError(f"unknown config key(s) {sorted(d)}; valid keys: stages, positions, seed")
            if not isinstance(stages, list):
                raise ValueError(f"stages must be a list, got {stages!r}")
            return cls([StageSpec.from_dict(s) for s in stages], positions, seed)
        return cls([StageSpec.from_dict(d)], positions, seed)

    @classmethod
    def from_json(cls, s: str) -> PruneConfig:
        return cls.from_dict(json.loads(s))
