"""Token selectors: pure functions ``fn(features[B, N, D], keep, *, valid_mask, **signals) -> LongTensor[B, keep]``.

Each submodule defines one selector function and a ``SPEC`` (:class:`vtprune.selectors.base.SelectorSpec`);
:mod:`vtprune.registry` imports them lazily by name, so nothing is imported here.

* ``fastervlm`` - top-k of the head-mean [CLS] attention (arXiv 2412.01818).
* ``divprune``  - greedy max-min cosine diversity (arXiv 2503.02175), clean-room from the design description.
* ``random``    - seeded uniform sampling without replacement (baseline).
* ``uniform``   - content-independent, spatially even lattice over the token grid (baseline).

The shared contract (ascending, unique, in range, exactly ``keep`` per row, rows independent, deterministic,
invalid tokens never chosen) lives in :mod:`vtprune.selectors.base`.
"""
