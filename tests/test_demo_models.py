"""The shipped demo models (vtprune/assets), the synthetic visual-QA generator and the accuracy benchmark harness."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from vtprune.demo_models import (
    DEMO_MODELS,
    IMAGE_SIZE,
    answer,
    build_prompt,
    demo_model,
    model_dir,
    parse_answer,
    training_record,
)

EVALS = Path(__file__).resolve().parents[1] / "evals"
sys.path.insert(0, str(EVALS))

from vtprune import synth as S  # noqa: E402

#: held-out items (split "heldout", seed 0) the shipped models answer correctly unpruned, two of every type
FIXED = {
    "llava": [0, 5, 1, 6, 2, 7, 3, 8, 4, 9],
    "qwen2_vl": [0, 5, 1, 6, 2, 7, 3, 8, 4, 9],
}


@pytest.fixture(scope="module", params=DEMO_MODELS)
def shipped(request):
    return request.param, *demo_model(request.param)


def test_assets_present_and_small():
    total = 0
    for name in DEMO_MODELS:
        d = model_dir(name)
        for f in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "training.json"):
            assert (d / f).is_file(), f"{d / f} missing"
        total += (d / "model.safetensors").stat().st_size
        rec = training_record(name)
        for k in ("device", "steps", "seed", "versions", "heldout", "train_minutes"):
            assert k in rec, k
    assert total <= 30 * 2**20


def test_loads_offline_in_eval_mode(shipped, monkeypatch):
    name, model, proc = shipped
    assert not model.training
    assert model.config.model_type == name
    assert next(model.parameters()).dtype == torch.float32
    assert proc.tokenizer.padding_side == "left"
    assert hasattr(proc, "image_processor")  # a full processor, not only the tokenizer (Qwen AutoProcessor gotcha)
    img = S.item("heldout", 0, size=IMAGE_SIZE[name]).image
    inputs = proc(images=[img], text=[build_prompt(name, "what colour is the small dot?")], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256  # >= 256 visual tokens


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'llava', 'qwen2_vl'"):
        demo_model("llava_next")
    with pytest.raises(ValueError, match="valid"):
        build_prompt("nope", "q?")


def test_shipped_models_answer_fixed_heldout_questions(shipped):
    name, model, proc = shipped
    items = [S.item("heldout", i, size=IMAGE_SIZE[name]) for i in FIXED[name]]
    assert {it.qa.qtype for it in items} == set(S.QUESTION_TYPES)
    preds = answer(model, proc, [it.image for it in items], [it.qa.question for it in items], name)
    right = sum(p == it.qa.answer for p, it in zip(preds, items))
    assert right >= 9, list(zip(preds, [it.qa.answer for it in items]))


def test_parse_answer():
    assert parse_answer(" Three.</s>") == "3"
    assert parse_answer("red</s></s>") == "red"
    assert parse_answer("  ") == ""
    assert parse_answer(" left side") == "left"


def _digest(it: S.Item) -> str:
    return hashlib.sha256(it.image.tobytes()).hexdigest()


def test_generator_deterministic_for_a_seed():
    a = S.dataset("heldout", 6, seed=3, size=224)
    b = S.dataset("heldout", 6, seed=3, size=224)
    assert [_digest(x) for x in a] == [_digest(x) for x in b]
    assert [(x.qa.question, x.qa.answer, x.qa.qtype) for x in a] == [(x.qa.question, x.qa.answer, x.qa.qtype)
                                                                   for x in b]
    c = S.dataset("heldout", 6, seed=4, size=224)
    assert all(_digest(x) != _digest(y) for x, y in zip(a, c))
    train = S.dataset("train", 6, seed=3, size=224)
    assert all(_digest(x) != _digest(y) for x, y in zip(a, train))
    # an item does not depend on which others were generated before it
    assert _digest(S.item("heldout", 4, seed=3, size=224)) == _digest(a[4])


def test_generator_questions_are_consistent_with_the_scene():
    for i in range(40):
        scene, qas = S.scene_qas("train", i)
        assert 1 <= len(scene.shapes) <= 4 and len({s.kind for s in scene.shapes}) == len(scene.shapes)
        by = {q.qtype: q for q in qas}
        assert by["counting"].answer == str(len(scene.shapes))
        assert by["detail"].answer == scene.dot_colour
        assert by["existence"].answer in ("yes", "no")
        assert by["location"].answer in ("left", "right", "top", "bottom")
        assert by["attribute"].answer in S.COLOURS
        assert all(q.answer in S.ANSWERS for q in qas)
    img = S.render(S.scene_qas("heldout", 0)[0], 448)
    assert img.size == (448, 448) and img.mode == "RGB"


def test_accuracy_harness_writes_valid_records(tmp_path):
    import bench_accuracy

    out = tmp_path / "acc.json"
    recs = bench_accuracy.main(["--models", "llava", "--n", "4", "--methods", "random,uniform", "--ratios", "0.25",
                                "--positions", "preserve", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == recs
    assert (tmp_path / "acc.png").stat().st_size > 0
    keys = {"model", "method", "stage", "positions", "keep_ratio", "question_type", "accuracy", "n"}
    assert all(keys <= set(r) for r in recs)
    assert {(r["method"], r["keep_ratio"]) for r in recs} == {("none", 1.0), ("random", 0.25), ("uniform", 0.25)}
    overall = [r for r in recs if r["question_type"] == "all"]
    assert len(overall) == 3 and all(r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 for r in overall)
    pruned = [r for r in recs if r["method"] != "none"]
    assert all(r["stage"] == "pre_llm" and r["positions"] == "preserve" and r["visual_tokens"] == 64 for r in pruned)
    # per-type counts add up to the overall count of each configuration
    for m in ("none", "random", "uniform"):
        assert sum(r["n"] for r in recs if r["method"] == m and r["question_type"] != "all") == 4


def test_accuracy_harness_runs_every_stage(tmp_path):
    """In-LLM methods run at llm:1 with preserved positions only; FlowCut runs its LLM-stage variant on Qwen2-VL and
    the record says so; a configuration a family cannot run is reported as not applicable (no record) instead of
    failing the run or being skipped silently."""
    import bench_accuracy

    out = tmp_path / "acc.json"
    recs = bench_accuracy.main(["--models", "qwen2_vl", "--n", "2", "--methods", "fastv,pdrop,flowcut", "--ratios",
                                "0.25", "--out", str(out)])
    got = {(r["method"], r["stage"], r["positions"]) for r in recs if r["question_type"] == "all"}
    assert got == {("none", "none", "none"), ("fastv", "llm:1", "preserve"), ("pdrop", "llm:1", "preserve"),
                   ("flowcut", "llm:2", "preserve")}  # flowcut + compact: refused in the LLM, so no record
    fastv = next(r for r in recs if r["method"] == "fastv")
    assert fastv["visual_tokens"] == 64
    assert bench_accuracy.prune_kwargs("pdrop", 0.25, "preserve") == {"method": "pdrop", "schedule": [(1, 0.25)]}
    assert bench_accuracy.prune_kwargs("fastv", 0.25, "compact") is None
    assert bench_accuracy.stage_of("flowcut") == "vision"


def _png_ok(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_demo_command_end_to_end(tmp_path, capsys):
    from vtprune.cli import main

    main(["demo", "--out", str(tmp_path), "--methods", "fastervlm,random", "--ratios", "0.25,0.05", "--samples", "4",
          "--repeats", "1", "--robot-episodes", "1"])
    text = capsys.readouterr().out
    assert "speed-up" in text and "device:" in text and "held-out accuracy" in text
    assert "256->64" in text and "256->13" in text  # tokens kept at 25 % and 5 % of 256
    assert "fastervlm@13" in text and "random@13" in text
    assert S.item("heldout", 3, size=224).qa.question in text  # the answers table lists every sample question
    # the robot part: the shipped policy, one held-out episode per task, unpruned and vla_pruner at 25 %
    assert "robot policy: the shipped Meta-World π0" in text and "vla_pruner keep 16/64 per camera" in text
    assert text.count("/1 solved") == 6 and "robot_episode.png" in text
    for f in ("kept_all.png", "kept_sample0.png", "kept_fastervlm_0.25.png", "kept_random_0.05.png",
              "robot_episode.png"):
        w, h = _png_ok(tmp_path / f)
        assert w > 50 and h > 50


def test_demo_command_rejects_unknown_method(tmp_path, capsys):
    from vtprune.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--methods", "fastervlm,bogus"])
    err = capsys.readouterr().err
    assert "'bogus'" in err and "divprune" in err


def test_viz_command_on_a_user_image(tmp_path, capsys):
    from vtprune.cli import main

    img = tmp_path / "mine.png"
    S.item("heldout", 2, size=300).image.save(img)  # any size: viz resizes to the model's input size
    main(["viz", str(img), "--model", "qwen2_vl", "--method", "divprune", "--keep", "32", "--out",
          str(tmp_path / "v.png")])
    text = capsys.readouterr().out
    assert "unpruned" in text and "divprune keep 32" in text
    _png_ok(tmp_path / "v.png")


def test_top_level_demo_model_is_the_loader():
    import vtprune

    assert vtprune.demo_model is demo_model


def test_train_tiny_is_reproducible_from_its_seed_and_stop_after_replays_a_cut_schedule(tmp_path):
    """Two runs of the training script with one seed write the same weights; ``--stop-after`` ends the run early
    on the full schedule and says so in ``training.json``; the result loads as a demo model and answers."""
    import train_tiny
    from safetensors.torch import load_file

    args = ["--family", "llava", "--seed", "3", "--steps", "3", "--stop-after", "2", "--pool", "4", "--eval-n", "5",
            "--eval-every", "100", "--warmup", "1", "--no-bf16", "--vision-hidden", "32", "--vision-layers", "2",
            "--text-hidden", "64", "--text-layers", "2"]
    threads = torch.get_num_threads()
    try:
        for d in ("a", "b"):
            train_tiny.main(args + ["--out", str(tmp_path / d)])
    finally:
        torch.set_num_threads(threads)  # the script pins its own thread count
    rec = json.loads((tmp_path / "a" / "training.json").read_text())
    assert (rec["steps"], rec["steps_planned"], rec["seed"]) == (2, 3, 3)
    assert rec["heldout"]["n"] == 5 and set(rec["heldout"]["accuracy"]) == {*S.QUESTION_TYPES, "all"}
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    model, proc = demo_model("llava", tmp_path / "a")
    fresh, _ = train_tiny.build("llava", {"vision_hidden": 32, "vision_layers": 2, "text_hidden": 64,
                                          "text_layers": 2}, 3)
    assert any(not torch.equal(p, fresh.state_dict()[k]) for k, p in model.state_dict().items())  # it trained
    it = S.item("heldout", 0, size=IMAGE_SIZE["llava"])
    assert len(answer(model, proc, [it.image], [it.qa.question], "llava")) == 1
    with pytest.raises(SystemExit):
        train_tiny.main(args + ["--out", str(tmp_path / "c"), "--stop-after", "4"])  # beyond the 3-step schedule
    assert not (tmp_path / "c").exists()
