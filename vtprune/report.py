"""PruneReport: what the last call kept, per image, with timings and estimated prefill cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class Timer:
    """Wall time of a region; on CUDA it records events and resolves them only when read (no sync on the hot path)."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._ms: float | None = None

    def __enter__(self) -> Timer:
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._ms = (time.perf_counter() - self._t0) * 1e3

    @property
    def ms(self) -> float:
        if self._ms is None:
            self._end.synchronize()
            self._ms = self._start.elapsed_time(self._end)
        return self._ms


@dataclass
class ImageReport:
    """One image of one sample.

    ``kept``: LongTensor[n_after] of indices into this image's own visual tokens (as the unpruned model lays them
    out, LLaVA-NeXT newline tokens included), ascending. ``n_newline``: layout tokens among the kept ones.
    ``ms``: this image's share of the (batched) selector call.
    """

    sample: int
    image: int
    kept: torch.Tensor
    n_before: int
    method: str
    stage: str
    n_newline: int = 0
    signal: str = ""
    grid: object = None  # (h, w) or [(h, w), ...] of the non-newline tokens, for pictures
    newline: torch.Tensor | None = None  # BoolTensor[n_before] of layout tokens, or None
    _timer: Timer | None = None
    _share: int = 1

    @property
    def n_after(self) -> int:
        return int(self.kept.numel())

    @property
    def ms(self) -> float:
        return self._timer.ms / self._share if self._timer is not None else 0.0


@dataclass
class PruneReport:
    """Report of the last pruned forward/generate call of a model.

    ``token_map``: LongTensor[B, L'] — for every position of the pruned sequence, the position in the caller's
    original sequence it came from (-1 for padding added to re-align rows).
    ``flops_before`` / ``flops_after``: estimated LLM prefill FLOPs summed over the batch
    (per layer 4·n·D² + 2·n²·D + 3·n·D·m for n attended tokens, D hidden size, m FFN width).
    """

    images: list[ImageReport] = field(default_factory=list)
    stage: str = "pre_llm"
    positions: str = "preserve"
    tokens_before: list[int] = field(default_factory=list)  # attended tokens per sample
    tokens_after: list[int] = field(default_factory=list)
    flops_before: float = 0.0
    flops_after: float = 0.0
    token_map: torch.Tensor | None = None
    note: str = ""
    #: LongTensor[B, n_layers]: visual tokens each decoder layer sees per sample (set when in-LLM stages run)
    layer_visual_tokens: torch.Tensor | None = None
    #: per sample, visual tokens averaged over the LLM layers (the number papers mean by "average 144")
    avg_visual_per_layer: list[float] = field(default_factory=list)
    #: method-specific facts of this call (VLA-Pruner: warm-up per row, kept tokens per criterion, recorded steps)
    details: dict = field(default_factory=dict)

    @property
    def visual_before(self) -> int:
        return sum(i.n_before for i in self.images)

    @property
    def visual_after(self) -> int:
        return sum(i.n_after for i in self.images)

    @property
    def selector_ms(self) -> float:
        return sum(i.ms for i in self.images)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def __str__(self) -> str:
        head = (f"{'sample':>6} {'image':>5} {'method':>10} {'stage':>8} {'before':>7} {'after':>6} {'newline':>7} "
                f"{'ms':>8}")
        rows = [f"vtprune report ({self.stage}, positions={self.positions})", head, "-" * len(head)]
        for i in self.images:
            rows.append(f"{i.sample:>6} {i.image:>5} {i.method:>10} {i.stage:>8} {i.n_before:>7} {i.n_after:>6} "
                        f"{i.n_newline:>7} {i.ms:>8.2f}")
        rows.append("-" * len(head))
        rows.append(f"visual tokens {self.visual_before} -> {self.visual_after}; LLM prefill tokens "
                    f"{sum(self.tokens_before)} -> {sum(self.tokens_after)}; est. prefill FLOPs "
                    f"{self.flops_before / 1e9:.3g} -> {self.flops_after / 1e9:.3g} GFLOP ({self.flops_ratio:.1%})")
        if self.avg_visual_per_layer:
            avg = sum(self.avg_visual_per_layer) / len(self.avg_visual_per_layer)
            rows.append(f"visual tokens per LLM layer, averaged over layers: {avg:.1f} per sample")
        if self.note:
            rows.append(self.note)
        return "\n".join(rows)

    __repr__ = __str__


def prefill_flops(n_tokens: list[int], hidden: int, ffn: int, layers: int) -> float:
    """Per-layer estimate 4nD² + 2n²D + 3nDm, summed over layers and samples (SELECTORS.md §4.3)."""
    return float(sum(layers * (4 * n * hidden**2 + 2 * n * n * hidden + 3 * n * hidden * ffn) for n in n_tokens))
