"""Integrations of vtprune with evaluation harnesses.

Each submodule imports its harness itself; importing ``vtprune`` or this package imports none of them.

* ``vtprune.integrations.lmms_eval``: ``--model vtprune`` for lmms-eval 0.7.x (``pip install vtprune[eval]``):
  lmms-eval's own model class ``base``, its transformers model pruned in place; registered through the
  ``lmms_eval.models`` entry-point group together with
* ``vtprune.integrations.lmms_hf``: ``--model vtprune_hf``, a generic batched transformers model with log-likelihoods
  (the base for families and tasks lmms-eval's own classes do not cover);
* ``vtprune.integrations.sweep``: ``vtprune sweep``, lmms-eval over methods x budgets, one table and one plot.
"""
