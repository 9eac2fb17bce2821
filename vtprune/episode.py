"""Episode state of temporal selectors (VLA-Pruner): what the earlier control steps of a robot episode recorded.

A control loop calls the policy once per step; VLA-Pruner keeps the visual tokens the *actions* attended to in the
last few steps, so each step records its action→vision attention and the next step reads it back. That history is
the only state vtprune carries from one call to the next on purpose, and it belongs to an episode, not to the model:

* ``with vtprune.episode(policy): ...`` gives the calls inside the block a fresh episode of their own (per context,
  so two threads or two concurrent evaluations never mix histories);
* outside such a block each thread has a default episode of its own;
* ``vtprune.reset(policy)`` clears the active episode, ``vtprune.reset(policy, rows=[i])`` only row i — a batch of
  B vectorised environments keeps B independent histories (one per batch row), and an environment that starts a new
  episode resets only its row.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

# id(adapter) -> the Episode that `episode()` made active for that pruned model in this context
_ACTIVE: contextvars.ContextVar[dict[int, Episode] | None] = contextvars.ContextVar("vtprune_episode", default=None)


class Episode:
    """Per batch row: the recorded action-attention vectors of the last control steps, per image of the row.

    ``history(row, image, window)`` -> up to ``window`` vectors ``FloatTensor[n_image]``, oldest first.
    """

    def __init__(self) -> None:
        self.rows: dict[int, list[dict[int, torch.Tensor]]] = {}

    def steps(self, row: int) -> int:
        return len(self.rows.get(row, ()))

    def history(self, row: int, image: int, window: int) -> list[torch.Tensor]:
        return [step[image] for step in self.rows.get(row, [])[-window:] if image in step]

    def record(self, row: int, vectors: dict[int, torch.Tensor], window: int) -> None:
        steps = self.rows.setdefault(row, [])
        steps.append(vectors)
        del steps[:-window]  # only the last `window` steps are ever read

    def reset(self, rows: list[int] | None = None) -> None:
        if rows is None:
            self.rows.clear()
        else:
            for r in rows:
                self.rows.pop(int(r), None)


def active(adapter: Any, local: Any) -> Episode:
    """The episode the running context uses for this pruned model: the one ``episode()`` opened, else the calling
    thread's default one (kept on ``local``, a ``threading.local`` of the model's state)."""
    opened = _ACTIVE.get()
    if opened and id(adapter) in opened:
        return opened[id(adapter)]
    ep = getattr(local, "episode", None)
    if ep is None:
        ep = local.episode = Episode()
    return ep


@contextlib.contextmanager
def opened(adapter: Any) -> Iterator[Episode]:
    """Make a fresh episode active for this pruned model in the running context until the block ends."""
    ep = Episode()
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), id(adapter): ep})
    try:
        yield ep
    finally:
        _ACTIVE.reset(token)
