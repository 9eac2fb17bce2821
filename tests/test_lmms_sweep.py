"""``vtprune sweep``: lmms-eval over a tiny grid writes its table, JSON and plot, baseline included."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional `eval` extra: pip install -e '.[eval]'")

from vtprune.cli import main  # noqa: E402
from vtprune.testing import tiny_llava  # noqa: E402

TASK = "vtprune_synth224_attribute"


def test_sweep_writes_table_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, proc = tiny_llava("llava")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "sweep"
    main(["sweep", "--model", str(tmp_path / "ckpt"), "--base", "vtprune_hf", "--methods", "divprune",
          "--keep", "4", "--tasks", TASK, "--limit", "2", "--out", str(out)])
    points = json.loads((out / "sweep.json").read_text())
    assert [(p["method"], p["keep"]) for p in points] == [("none", None), ("divprune", 4)]
    assert points[0]["visual_tokens"] == points[0]["visual_tokens_before"] > 4
    assert points[1]["visual_tokens"] == 4
    assert all(p["prefill_ms"] > 0 and 0 <= p["metrics"][TASK]["value"] <= 1 for p in points)
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| method | keep | visual tokens | prefill ms | vtprune_synth224_attribute (acc)")
    assert [r.split("|")[1].strip() for r in table[2:]] == ["none", "divprune"]
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "sweep.md" in capsys.readouterr().out


def test_sweep_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--model", "vtprune:llava", "--methods", "bogus", "--keep", "4", "--tasks", TASK])
    assert "unknown methods ['bogus']; valid choices: " in capsys.readouterr().err
