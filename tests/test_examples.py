"""The example scripts run as a user runs them (in-process, offline, on the shipped demo model)."""

from __future__ import annotations

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "pruned  :" in out and "visual tokens 256 -> 32" in out
