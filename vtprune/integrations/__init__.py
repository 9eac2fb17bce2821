"""Integrations of vtprune with evaluation harnesses.

Each submodule imports its harness itself; importing ``vtprune`` or this package imports none of them.

* ``vtprune.integrations.lmms_eval``: the ``--model vtprune`` model for lmms-eval 0.7.x (``pip install
  vtprune[eval]``), registered through the ``lmms_eval.models`` entry-point group.
"""
