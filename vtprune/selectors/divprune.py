"""DivPrune: greedy max-min cosine diversity over the visual tokens.

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR'25, arXiv 2503.02175.
The reference code is CC BY-NC 4.0; this is a clean-room implementation from the algorithm description in the
vtprune design notes (SELECTORS.md section 6.2), with the reference's duplicate-index defect fixed.

Algorithm, with ``d_ij = 1 - cos(x_i, x_j)`` in fp32:

1. first pick: the token whose nearest valid neighbour is farthest, ``argmax_j min_{i != j} d_ji``;
2. every next pick: ``argmax_j min_{s in S} d_sj`` over unselected valid ``j``;
3. return the picks sorted ascending.

Selected and invalid tokens score ``-inf``, so picks are unique even when tokens are exact duplicates. Ties go to
the lowest index because ``torch.max`` / ``torch.argmax`` return the first maximal index (documented behaviour).

Non-finite features: a token whose feature row holds a NaN or ±inf has no position in the cosine geometry, so it is
no one's neighbour and a candidate of last resort: the greedy runs on the finite valid tokens exactly as if the
others were absent, and only once those are all picked are the non-finite ones added, lowest index first (their
score is ``NONFINITE_SCORE``, below every real distance, above the ``-inf`` of picked and invalid tokens). So the
output stays unique, ascending and exactly ``keep`` per row.

Cost per row: one ``O(N^2 D)`` Gram matrix (upper-triangle blocks only, mirrored), then ``keep`` steps of
``O(N)`` each (a running-min vector updated with one gathered distance row), all batched over ``B`` with no host
synchronisation inside the step loop. The plain greedy recomputes the min over all selected rows each step,
``O(K^2 N)``; both share the ``O(N^2 D)`` matrix, which dominates end to end for D in the thousands.

Memory: the dense path holds one fp32 ``[B, N, N]`` distance matrix (N=576: 1.3 MB, N=2880: 33 MB,
N=4096: 64 MB per row) plus one ``[B, <=512, N]`` block; batches are split into row groups so that at most
``DENSE_MAX_ELEMENTS`` floats (256 MB) of matrix exist at once. Above ``DENSE_MAX_N`` tokens it switches to ``O(B N)``
extra memory: nearest-neighbour distances in row blocks and each step's distance row computed on the fly
(``O(N D)`` per step, so slower but bounded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import SelectorSpec, check_inputs, detached

NAME = "divprune"

# Largest N for which a full [N, N] distance matrix is materialised per row (64 MB at fp32); above it, blockwise.
DENSE_MAX_N = 4096
# Cap on the floats of the [rows, N, N] matrices held at once (256 MB): larger batches are processed in row groups.
DENSE_MAX_ELEMENTS = 2**26
# Rows of the distance matrix computed at once in the blockwise path: bounds its scratch to B * 1024 * N floats.
BLOCK_ROWS = 1024
# Added to the norm so that a zero vector normalises to zero (cosine 0, distance 1 to everything) instead of NaN.
NORM_EPS = 1e-12
# Score (and reported radius) of a valid token with non-finite features: below any cosine distance (>= 0 up to
# rounding), above -inf (picked / invalid), so such tokens are picked only after every finite one, in index order.
NONFINITE_SCORE = -1.0


def _normalise(features: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` -> fp32 unit vectors ``[B, N, D]``; zero vectors stay zero."""
    x = features.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """Plain dense cosine distance ``d[b, i, j] = 1 - cos(x_bi, x_bj)`` as fp32 ``[B, N, N]``.

    One full batched matmul of the normalised features, diagonal as computed (about 0; 1 for a zero vector).
    This is the straightforward construction the reference loop uses; :func:`divprune_order` builds the same
    values from half as many products (see :func:`distance_and_nn`).
    """
    xn = _normalise(features)
    return torch.bmm(xn, xn.transpose(1, 2)).neg_().add_(1.0)


def _block_rows(n: int) -> int:
    """Row-block size for :func:`distance_and_nn`; ``n`` means one full matmul.

    Small N gains nothing from splitting; for larger N, blocks of 128..512 rows keep the matmuls efficient while
    skipping most of the lower triangle (measured on CPU: N=576 -> 144, N=2880 -> 512 are ~1.5x faster than
    one full matmul).
    """
    if n < 384:
        return n
    return max(128, min(512, -(-n // 4)))


def distance_and_nn(
    xn: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance matrix with a ``-inf`` diagonal and every token's nearest-neighbour distance.

    The matrix is symmetric, so only the blocks on or above the diagonal are multiplied and the rest is mirrored;
    the nearest-neighbour minima are taken from each block while it is still in cache instead of in a second
    pass over ``N^2`` floats.

    Args:
        xn: fp32 unit vectors ``[B, N, D]``.
        valid_mask: optional ``BoolTensor[B, N]``; invalid tokens are nobody's neighbour.

    Returns:
        ``distance FloatTensor[B, N, N]`` (``d_ij = 1 - <xn_i, xn_j>``, diagonal ``-inf``) and
        ``nn FloatTensor[B, N]`` (``min`` over valid ``i != j`` of ``d_ji``; ``+inf`` if there is none).
    """
    b, n, _ = xn.shape
    inf = float("inf")
    bs = _block_rows(n)
    xt = xn.transpose(1, 2)
    dist = torch.empty(b, n, n, dtype=torch.float32, device=xn.device)
    nn = torch.full((b, n), inf, dtype=torch.float32, device=xn.device)
    invalid = None if valid_mask is None else ~valid_mask
    for lo in range(0, n, bs):
        hi = min(lo + bs, n)
        blk = torch.bmm(xn[:, lo:hi], xt[:, :, lo:]).neg_().add_(1.0)  # rows lo:hi, cols lo:n
        diag = blk[:, :, : hi - lo].diagonal(dim1=1, dim2=2)
        diag.fill_(inf)
        if invalid is None:
            row_min, col_min = blk.amin(dim=2), blk.amin(dim=1)
        else:
            row_min = blk.masked_fill(invalid[:, None, lo:], inf).amin(dim=2)
            col_min = blk.masked_fill(invalid[:, lo:hi, None], inf).amin(dim=1)
        torch.minimum(nn[:, lo:hi], row_min, out=nn[:, lo:hi])
        torch.minimum(nn[:, lo:], col_min, out=nn[:, lo:])
        # -inf on the diagonal: "min with the picked token's own row" then also drops that token from the
        # candidates, which saves a scatter per greedy step.
        diag.fill_(-inf)
        dist[:, lo:hi, lo:] = blk
        if hi < n:
            dist[:, hi:, lo:hi] = blk[:, :, hi - lo:].transpose(1, 2)
    return dist, nn


def _greedy_steps(
    row_of: Callable[[torch.Tensor], torch.Tensor], nn: torch.Tensor, keep: int, valid_mask: torch.Tensor | None,
    weak: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min picks given each token's nearest-neighbour distance ``nn[B, N]``.

    ``row_of(cur LongTensor[B]) -> FloatTensor[B, N]`` returns the distance row of each row's latest pick with
    ``-inf`` at the pick itself. ``O(N)`` work and a few kernel launches per step, no host synchronisation: the
    running minimum ``score_j = min_{s in S} d_sj`` is updated with that one row, and the ``-inf`` entry removes
    the pick from the candidates without a separate scatter. ``weak`` (``BoolTensor[B, N]``, optional): valid
    tokens that start at ``NONFINITE_SCORE``; the running minimum keeps them there (their distances are finite, at
    most 2) until they are picked, so they come after every other candidate.
    """
    b, n = nn.shape
    inf = float("inf")
    invalid = None if valid_mask is None else ~valid_mask
    start = nn if weak is None else nn.masked_fill(weak, NONFINITE_SCORE)
    start = start if invalid is None else start.masked_fill(invalid, -inf)
    # torch.max(dim) returns the first maximal index, so ties go to the lowest index.
    radius, cur = start.max(dim=-1)
    picks, radii = [cur], [radius]
    score = torch.full((b, n), inf, dtype=torch.float32, device=nn.device)
    if weak is not None:
        score.masked_fill_(weak, NONFINITE_SCORE)
    if invalid is not None:
        score.masked_fill_(invalid, -inf)
    for _ in range(keep - 1):
        torch.minimum(score, row_of(cur), out=score)
        radius, cur = score.max(dim=-1)
        picks.append(cur)
        radii.append(radius)
    return torch.stack(picks, dim=1), torch.stack(radii, dim=1)


def _dense_rows(distance: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row lookup into a ``-inf``-diagonal ``[B, N, N]`` matrix: one ``index_select`` per step."""
    b, n, _ = distance.shape
    flat = distance.view(b * n, n)
    if b == 1:
        return lambda cur: flat.index_select(0, cur)
    base = torch.arange(b, device=distance.device) * n
    return lambda cur: flat.index_select(0, cur + base)


def greedy_maxmin(
    distance: torch.Tensor, keep: int, valid_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max-min selection on a precomputed distance matrix (the selection half of DivPrune).

    Args:
        distance: fp32 ``[B, N, N]``; row ``s`` holds ``d(s, .)``. Its diagonal is overwritten in place.
        keep: number of picks, ``1 <= keep <= valid tokens per row``.
        valid_mask: optional ``BoolTensor[B, N]``.

    Returns:
        ``(order, radius)``: ``LongTensor[B, keep]`` picks in selection order and ``FloatTensor[B, keep]`` the
        score of each pick (pick 1: its nearest-neighbour distance, ``+inf`` if it is the only valid token;
        pick t >= 2: its min distance to the earlier picks).
    """
    inf = float("inf")
    diag = distance.diagonal(dim1=1, dim2=2)
    diag.fill_(inf)
    cols = distance if valid_mask is None else distance.masked_fill(~valid_mask[:, None, :], inf)
    nn = cols.amin(dim=-1)
    diag.fill_(-inf)
    return _greedy_steps(_dense_rows(distance), nn, keep, valid_mask)


def _blockwise(xn: torch.Tensor, keep: int, valid_mask: torch.Tensor | None, neighbours: torch.Tensor | None = None,
               weak: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy on unit vectors ``xn[B, N, D]`` without the ``[B, N, N]`` matrix: ``O(B N)`` extra memory.

    ``neighbours`` (default ``valid_mask``): tokens that count as nearest neighbours; ``weak``: see
    :func:`_greedy_steps`."""
    b, n, d = xn.shape
    inf = float("inf")
    xt = xn.transpose(1, 2)
    nn = torch.empty(b, n, dtype=torch.float32, device=xn.device)
    for lo in range(0, n, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, n)
        blk = torch.bmm(xn[:, lo:hi], xt).neg_().add_(1.0)  # [B, hi-lo, N]
        blk[:, :, lo:hi].diagonal(dim1=1, dim2=2).fill_(inf)
        if neighbours is not None:
            blk.masked_fill_(~neighbours[:, None, :], inf)
        nn[:, lo:hi] = blk.amin(dim=-1)

    def row_of(cur: torch.Tensor) -> torch.Tensor:
        q = xn.gather(1, cur[:, None, None].expand(b, 1, d))  # [B, 1, D]
        row = torch.bmm(q, xt).squeeze(1).neg_().add_(1.0)  # [B, N], O(N D)
        return row.scatter_(1, cur[:, None], -inf)

    return _greedy_steps(row_of, nn, keep, valid_mask, weak)


def _order(features: torch.Tensor, keep: int, valid_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`divprune_order` without input checks."""
    b, n, _ = features.shape
    # Selection is not differentiable, and the greedy updates its buffers with ``out=``, which autograd refuses.
    x = detached(features)
    finite = torch.isfinite(x).all(-1)  # [B, N]
    neighbours, weak = valid_mask, None
    if not bool(finite.all()):  # one host read per call; all-finite input takes the unchanged path
        # Zeroed rows keep every distance finite (1 to everything); ``weak`` then ranks them last, and they are
        # nobody's neighbour, so the finite tokens are picked exactly as if the others were absent.
        x = torch.where(finite[..., None], x, 0.0)
        weak = ~finite if valid_mask is None else valid_mask & ~finite
        neighbours = finite if valid_mask is None else valid_mask & finite
    xn = _normalise(x)
    if n > DENSE_MAX_N:
        return _blockwise(xn, keep, valid_mask, neighbours, weak)
    # Rows are independent, so bounding the matrix by processing a few rows at a time changes nothing.
    rows = max(1, DENSE_MAX_ELEMENTS // (n * n))
    parts = []
    for lo in range(0, b, rows):
        vm = None if valid_mask is None else valid_mask[lo : lo + rows]
        nb = None if neighbours is None else neighbours[lo : lo + rows]
        wk = None if weak is None else weak[lo : lo + rows]
        dist, nn = distance_and_nn(xn[lo : lo + rows], nb)
        parts.append(_greedy_steps(_dense_rows(dist), nn, keep, vm, wk))
        del dist
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def divprune_order(
    features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DivPrune picks in selection order, with their selection radii.

    Args:
        features: ``[B, N, D]`` tokens (any float dtype/device; distances in fp32).
        keep: picks per row, ``1 <= keep <= N``.
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never picked and are not neighbours.

    Returns:
        ``(order LongTensor[B, keep], radius FloatTensor[B, keep])``; see :func:`greedy_maxmin`. A token with
        non-finite features is picked only after every finite valid one, with radius ``NONFINITE_SCORE``.
    """
    check_inputs(NAME, features, keep, valid_mask)
    return _order(features, keep, valid_mask)


def divprune_select(
    features: torch.Tensor, keep: int, *, valid_mask: torch.Tensor | None = None, **signals: Any
) -> torch.Tensor:
    """DivPrune selection: ``keep`` mutually distant tokens per row.

    Args:
        features: ``[B, N, D]`` projected visual tokens (the LLM embedding space, per the paper).
        keep: tokens to keep per row, ``1 <= keep <= N``.
        valid_mask: optional ``BoolTensor[B, N]``; False tokens are never chosen.
        **signals: adapter signals; DivPrune needs none and ignores them.

    Tokens with a non-finite feature row are chosen only when the finite valid tokens do not fill ``keep`` (see
    the module docstring). Features may require grad; selection runs on a detached view.

    Returns:
        ``LongTensor[B, keep]`` on ``features.device``, ascending and unique.
    """
    check_inputs(NAME, features, keep, valid_mask)
    b, n, _ = features.shape
    if keep == n:
        return torch.arange(n, device=features.device).expand(b, n).clone()
    order, _ = _order(features, keep, valid_mask)
    return order.sort(dim=-1).values


def divprune_reference_loop(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Plain per-step greedy for one row, for tests and the benchmark only.

    Recomputes ``min_{s in S} d_sj`` over every selected row at each step (``O(K^2 N)``) and reads each pick back
    to the host with ``.item()``. Its distances come from one plain full matmul (:func:`cosine_distance`); the
    fast path multiplies only the upper-triangle blocks, which gives bit-identical values wherever the GEMM
    reduces each dot product in the same order for every block shape (true for the CPU kernels tested), so the
    picks are identical to :func:`divprune_select`.

    Args:
        features: ``[N, D]`` tokens of one row.
        keep: ``1 <= keep <= N``.

    Returns:
        ``LongTensor[keep]`` ascending, on ``features.device``.
    """
    if features.dim() != 2:
        raise ValueError(f"{NAME}: reference loop takes features of shape [N, D], got {tuple(features.shape)}")
    check_inputs(NAME, features[None], keep, None)
    return reference_greedy_loop(cosine_distance(features[None])[0], keep)


def reference_greedy_loop(distance: torch.Tensor, keep: int) -> torch.Tensor:
    """The plain greedy of :func:`divprune_reference_loop` on a precomputed ``[N, N]`` distance matrix.

    Overwrites the diagonal of ``distance`` (no ``N^2`` copy, like the fast path); the diagonal is never read
    afterwards because selected tokens are masked.
    """
    nn = distance.fill_diagonal_(float("inf")).amin(dim=1)
    selected = [int(nn.argmax().item())]
    for _ in range(keep - 1):
        m = distance[selected].amin(dim=0)
        m[selected] = float("-inf")
        selected.append(int(m.argmax().item()))
    return torch.tensor(sorted(selected), dtype=torch.long, device=distance.device)


SPEC = SelectorSpec(
    name=NAME,
    fn=divprune_select,
    newlines="pool",
    stages=("pre_llm", "llm"),
    description="DivPrune (arXiv 2503.02175): greedy max-min cosine diversity over the projected visual tokens "
                "(most isolated token first, then farthest from the kept set); unique picks, ascending order.",
)
