"""Uniform baseline: a spatially even, content-independent lattice of tokens over the token grid.

The selection analogue of the spatial-pool baseline (design notes section 7.6): instead of averaging windows it
keeps one token near the centre of each cell of a roughly ``r x (q / r)`` partition of every ``h x w`` grid.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from .base import SelectorSpec, check_inputs

NAME = "uniform"


def _parse_grid(grid: Any, n: int) -> list[tuple[int, int]]:
    """Normalise the ``grid`` signal to a list of ``(h, w)`` segments whose areas sum to ``n``."""
    if grid is None:
        return [(1, n)]

    def as_int(v: Any) -> int | None:
        # operator.index accepts int-like values (numpy ints, 0-d integer tensors) but not floats.
        if isinstance(v, bool):
            return None
        try:
            return operator.index(v)
        except TypeError:
            return None

    def as_hw(g: Any) -> tuple[int, int] | None:
        if isinstance(g, (tuple, list)) and len(g) == 2:
            h, w = as_int(g[0]), as_int(g[1])
            if h is not None and w is not None:
                return h, w
        return None

    single = as_hw(grid)
    if single is not None:
        segments = [single]
    elif isinstance(grid, (tuple, list)) and len(grid) > 0 and all(as_hw(g) is not None for g in grid):
        segments = [as_hw(g) for g in grid]  # type: ignore[misc]
    else:
        raise ValueError(f"{NAME}: signal 'grid' must be (h, w) or a list of (h, w) segments, got {grid!r}")
    if any(h < 1 or w < 1 for h, w in segments):
        raise ValueError(f"{NAME}: grid segments must have positive sides, got {grid!r}")
    total = sum(h * w for h, w in segments)
    if total != n:
        raise ValueError(f"{NAME}: grid {grid!r} covers {total} tokens but features have N={n}")
    return segments


def split_budget(areas: Sequence[int], keep: int) -> list[int]:
    """Split ``keep`` over segments proportionally to ``areas`` (largest remainder, ties to the earlier segment).

    Exact integer arithmetic; the parts sum to ``keep`` and never exceed their area (requires
    ``keep <= sum(areas)``).
    """
    total = sum(areas)
    parts = [keep * a // total for a in areas]
    rema = [keep * a % total for a in areas]
    short = keep - sum(parts)
    # Only segments with a non-zero remainder may get +1: their exact quota is fractional, so floor + 1 <= area.
    for i in sorted(range(len(areas)), key=lambda i: (-rema[i], i))[:short]:
        parts[i] += 1
    return parts


def lattice(h: int, w: int, q: int) -> list[int]:
    """``q`` distinct raster indices spread evenly over an ``h x w`` grid, ascending.

    ``r`` rows, ``r ~ sqrt(q h / w)`` so cells are about square, clamped so every row fits in ``w`` columns and
    no more rows than points or grid rows; row ``i`` holds ``q // r`` or ``q // r + 1`` points. Row ``i`` sits at
    ``y = floor((i + 0.5) h / r)`` and its ``n_i`` points at ``x = floor((j + 0.5) w / n_i)``: cell centres, which
    are distinct because ``r <= h`` and ``n_i <= w``.
    """
    if q <= 0:
        return []
    r = round(math.sqrt(q * h / w))
    r = max(-(-q // w), min(r, h, q))
    base, extra = divmod(q, r)
    out = []
    for i in range(r):
        # Bresenham-style spread of the ``extra`` longer rows so they are not all at the top.
        n_i = base + ((i + 1) * extra // r - i * extra // r)
        y = (2 * i + 1) * h // (2 * r)
        out.extend(y * w + (2 * j + 1) * w // (2 * n_i) for j in range(n_i))
    return out


def uniform_select(
    features: torch.Tensor,
    keep: int,
    *,
    valid_mask: torch.Tensor | None = None,
    grid: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    **signals: Any,
) -> torch.Tensor:
    """Spatially even ``keep`` tokens per row, identical for every row.

    Args:
        features: ``[B, N, D]``; only the shape and device are used.
        keep: tokens to keep per row, ``1 <= keep <= N``.
        valid_mask: must be None or all True: the lattice is defined on a full grid.
        grid: ``(h, w)`` with ``h * w == N``, or a list of ``(h, w)`` segments in token order whose areas sum to
            N (e.g. base image then crops); default one ``(1, N)`` row, i.e. evenly spaced indices.
            ``keep`` is split over segments in proportion to their area.
        **signals: other adapter signals, ignored.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending.
    """
    check_inputs(NAME, features, keep, valid_mask)
    b, n, _ = features.shape
    if valid_mask is not None and not bool(valid_mask.all()):
        raise ValueError(f"{NAME}: uniform needs a full grid; valid_mask must be None or all True "
                         f"(invalid tokens in rows {(~valid_mask).any(1).nonzero().flatten().tolist()})")
    segments = _parse_grid(grid, n)
    idx: list[int] = []
    offset = 0
    for (h, w), q in zip(segments, split_budget([h * w for h, w in segments], keep)):
        idx.extend(offset + i for i in lattice(h, w, q))
        offset += h * w
    return torch.tensor(idx, dtype=torch.long, device=features.device).expand(b, keep).clone()


SPEC = SelectorSpec(
    name=NAME,
    fn=uniform_select,
    optional=("grid",),
    newlines="keep",
    description="Uniform baseline: content-independent, spatially even lattice over the (h, w) token grid "
                "(signal 'grid'; segments get budget in proportion to area); ascending order.",
)
