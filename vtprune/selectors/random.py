"""Random baseline: seeded uniform sampling of ``keep`` visual tokens without replacement.

Content-independent: the draw depends only on the row's seed, N and the valid mask (design notes section 7.5), so
non-finite features cannot affect it; tokens whose ``valid_mask`` is False are never drawn.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SelectorSpec, check_inputs, topk_sorted

NAME = "random"
# What torch.Generator.manual_seed accepts: [-2**63, 2**64) (a Python int outside raises an opaque overflow).
SEED_RANGE = (-(2**63), 2**64)


def _row_seeds(seed: Any, b: int) -> list[int]:
    """Normalise the ``seed`` signal (int or ``LongTensor[B]``) to one Python int per row."""
    if seed is None:
        return [0] * b
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 1 or seed.shape[0] != b or seed.dtype.is_floating_point or seed.dtype == torch.bool:
            raise ValueError(f"{NAME}: signal 'seed' tensor must be an integer tensor of shape {(b,)}, "
                             f"got {tuple(seed.shape)} {seed.dtype}")
        return [int(s) for s in seed.tolist()]  # one host read per call, not per step
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{NAME}: signal 'seed' must be an int or a LongTensor[B], got {seed!r}")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"{NAME}: signal 'seed' must be an int in [-2**63, 2**64), got {seed!r}")
    return [seed] * b


def random_select(
    features: torch.Tensor,
    keep: int,
    *,
    valid_mask: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    **signals: Any,
) -> torch.Tensor:
    """Uniform random ``keep``-subset of the valid tokens of each row.

    Args:
        features: ``[B, N, D]``; only the shape and device are used.
        keep: tokens to keep per row, ``1 <= keep <= N``.
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never chosen.
        seed: optional ``int`` (same seed for every row) or integer ``Tensor[B]`` (one seed per row); default 0.
        **signals: other adapter signals, ignored.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending. Each row draws a random permutation from its own
        CPU ``torch.Generator``, so the result is the same on every device and independent of the other rows;
        the permutation ranks are distinct, so the subset is exactly uniform (no score ties).
    """
    check_inputs(NAME, features, keep, valid_mask)
    b, n, _ = features.shape
    seeds = _row_seeds(seed, b)
    ranks = torch.empty(b, n, dtype=torch.float32)
    for row, s in enumerate(seeds):
        gen = torch.Generator(device="cpu")
        gen.manual_seed(s)
        ranks[row] = torch.randperm(n, generator=gen).float()  # exact for N < 2**24
    mask = None if valid_mask is None else valid_mask.cpu()
    return topk_sorted(ranks, keep, mask).to(features.device)


SPEC = SelectorSpec(
    name=NAME,
    fn=random_select,
    optional=("seed",),
    stages=("pre_llm", "llm"),
    newlines="keep",
    description="Random baseline: uniform sampling without replacement over the valid tokens, seeded per row "
                "(signal 'seed': int or LongTensor[B], default 0); content-independent, ascending order.",
)
