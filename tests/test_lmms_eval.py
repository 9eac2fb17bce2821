"""The lmms-eval plugin (``--model vtprune``): real CLI runs on saved tiny checkpoints, plus in-process checks of
``generate_until`` / ``loglikelihood`` against independent references.

lmms-eval's CLI exits 0 even when evaluation fails, so every CLI check reads the results JSON, the samples JSONL or
the log, never the exit code. The CLI runs are started once, two at a time, by a module fixture (each costs ~15 s,
mostly lmms-eval's import and task indexing) and the tests wait for the ones they read.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional `eval` extra: pip install -e '.[eval]'")

from lmms_eval.api.instance import Instance  # noqa: E402

import vtprune  # noqa: E402
from vtprune.integrations.lmms_eval import VTPruneLMM, build_prune_config, load_processor  # noqa: E402
from vtprune.testing import tiny_llava, tiny_qwen2_vl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "evals" / "tasks"
TASK_DIR = TASKS / "vtprune_synth"
LIMIT = 8
N_CHOICES = 4
REQUESTS = LIMIT + LIMIT * N_CHOICES  # generation requests + one log-likelihood request per choice
KEEP = 8


# ---- saved checkpoints and CLI runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny checkpoint (model + processor) per family, plus a config-only directory of a family vtprune
    does not support (the plugin rejects it before loading weights)."""
    from transformers import FuyuConfig

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (model, proc) in {"llava": tiny_llava("llava"), "qwen2_vl": tiny_qwen2_vl("qwen2_vl")}.items():
        model.save_pretrained(root / name)
        proc.save_pretrained(root / name)
        out[name] = root / name
    FuyuConfig().save_pretrained(root / "fuyu")
    out["fuyu"] = root / "fuyu"
    return out


@dataclass
class Run:
    out: Path
    log: str

    def results(self) -> dict:
        files = glob.glob(str(self.out / "**" / "*_results.json"), recursive=True)
        assert len(files) == 1, f"expected one results file under {self.out}, found {files}\n--- log tail ---\n" + \
            self.log[-3000:]
        return json.loads(Path(files[0]).read_text())

    def samples(self, task: str) -> dict[int, dict]:
        files = glob.glob(str(self.out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        assert len(files) == 1, f"no samples file for {task} under {self.out}\n" + self.log[-3000:]
        rows = [json.loads(line) for line in Path(files[0]).read_text().splitlines() if line.strip()]
        return {r["doc_id"]: r for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(workdir: Path, model_args: str, processes: int = 1, tasks: str = "vtprune_synth,vtprune_synth_mc") -> Run:
    out = workdir / "out"
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           # one thread per process: two runs (or ranks) share this machine's 2 cores without oversubscribing
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    launch = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        # `python -m accelerate.commands.launch` = `accelerate launch` without the console script, which imports
        # timm (unusable without torchvision). On a CPU-only machine --multi_gpu is what starts N processes
        # (torchrun-style, gloo process group); without it accelerate silently runs one.
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port()), "-m", "lmms_eval"]
    cmd = [*launch, "--model", "vtprune", "--model_args", model_args, "--tasks", tasks, "--include_path", str(TASKS),
           "--limit", str(LIMIT), "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    return Run(out, proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory) -> dict[str, Future]:
    """All CLI runs of this module, started at once, two at a time; a test waits for the ones it reads."""
    llava, qwen = ckpts["llava"], ckpts["qwen2_vl"]
    specs = {  # longest first
        "llava_divprune_2proc": (f"pretrained={llava},method=divprune,keep={KEEP}", 2),
        "llava_divprune": (f"pretrained={llava},method=divprune,keep={KEEP}", 1),
        "llava_none": (f"pretrained={llava},method=none", 1),
        # a whole stage list as one JSON value (lmms-eval splits model_args on commas outside brackets/quotes)
        "qwen_fastervlm": (f'pretrained={qwen},stages=[{{"method":"fastervlm","keep":{KEEP}}}],seed=3', 1),
        "bad_method": (f"pretrained={llava},method=bogus,keep=8", 1),
        "bad_keep": (f"pretrained={llava},method=divprune,keep=-3", 1),
        "bad_model": (f"pretrained={ckpts['fuyu']},method=divprune,keep=8", 1),
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_cli, tmp_path_factory.mktemp(name), args, procs, "vtprune_synth" if
                                 name.startswith("bad") else "vtprune_synth,vtprune_synth_mc")
               for name, (args, procs) in specs.items()}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module", autouse=True)
def _start_cli_runs_early(request):
    """Start the CLI runs before the in-process tests when any CLI test is selected, so they overlap."""
    if any("runs" in getattr(item, "fixturenames", ()) and item.module is request.module
           for item in request.session.items):
        request.getfixturevalue("runs")


def _tokens_per_image(ckpt: Path) -> int:
    """Visual tokens the unpruned model gets for one task image, counted in the processor's own output."""
    from PIL import Image
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    proc = load_processor(str(ckpt))
    token = "<image>" if cfg.model_type == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    img = Image.open(TASK_DIR / "images" / "00.png").convert("RGB")
    ids = proc(images=[img], text=[f"{token} what?"], return_tensors="pt")["input_ids"]
    return int((ids == cfg.image_token_id).sum())


def _stats(res: dict) -> dict:
    tp = res.get("throughput") or {}
    stats = {k[len("avg_vtprune_"):]: v for k, v in tp.items() if k.startswith("avg_vtprune_")}
    assert stats, f"no vtprune statistics in the results' throughput block: {tp}"
    return stats


def _check_run(run: Run, ckpt: Path, expected_config: dict, budget: int | None) -> dict:
    res = run.results()
    for task in ("vtprune_synth", "vtprune_synth_mc"):
        acc = res["results"][task]["acc,none"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (task, acc)
        assert res["n-samples"][task]["effective"] == LIMIT
    n = _tokens_per_image(ckpt)
    after = n if budget is None else min(budget, n)
    st = _stats(res)
    assert st["visual_tokens_before"] == n
    assert st["visual_tokens_after"] == after
    assert st["visual_tokens_per_layer"] == after  # pre_llm pruning: every LLM layer sees the kept tokens
    assert st["samples"] == REQUESTS and st["images"] == REQUESTS
    assert st["prefill_ms"] > 0
    assert st["llm_input_tokens"] > after
    assert "vtprune run: " in run.log and json.dumps(expected_config) in run.log  # full config in the log
    # per sample: statistics and the full config ride on lmms-eval's token_counts
    for s in run.samples("vtprune_synth").values():
        tc = s["token_counts"][0]
        assert tc["vtprune"]["config"] == expected_config
        assert tc["vtprune"]["visual_tokens_before"] == n and tc["vtprune"]["visual_tokens_after"] == after
        assert tc["input_tokens"] == tc["vtprune"]["llm_input_tokens"]
        assert 1 <= tc["output_tokens"] <= 4  # the task's max_new_tokens
    assert res["efficiency"]["by_task"]["vtprune_synth"]["total_input_tokens"] == sum(
        s["token_counts"][0]["input_tokens"] for s in run.samples("vtprune_synth").values())
    return res


def _mc_losses(run: Run) -> dict[int, list[float]]:
    import ast

    return {d: [ast.literal_eval(r)[0] if isinstance(r, str) else r[0] for r in s["filtered_resps"]]
            for d, s in run.samples("vtprune_synth_mc").items()}


# ---- in process: the model class against independent references ---------------------------------------------------
def _docs() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()[:4]]


def _visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(TASK_DIR / doc["image"]).convert("RGB")]


def _lm(ckpt: Path, **kw) -> VTPruneLMM:
    lm = VTPruneLMM(pretrained=str(ckpt), device="cpu", **kw)
    lm.task_dict = {"t": {"test": _docs()}}
    return lm


def _gen_requests(gen_kwargs: dict) -> list[Instance]:
    # different question lengths in one batch: left padding is exercised
    return [Instance("generate_until", (d["question"] + (" Answer with one word." if i % 2 else ""), dict(gen_kwargs),
                                        _visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(_docs())]


def _ll_requests() -> list[Instance]:
    out = []
    for i, d in enumerate(_docs()):
        for j, choice in enumerate(d["choices"][:2]):
            out.append(Instance("loglikelihood", (d["question"], " " + choice, _visual, i, "t", "test"), idx=j,
                                metadata={"task": "t", "doc_id": i, "repeats": 1}))
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_loglikelihood_equals_label_loss_of_pruned_model(ckpts, family):
    """The plugin's (loss, greedy) per continuation == the pruned model's own language-modelling loss with labels
    on the continuation only (vtprune compacts labels like input_ids), one sample at a time."""
    lm = _lm(ckpts[family], method="divprune", keep=KEEP, batch_size=3)
    reqs = _ll_requests()
    got = lm.loglikelihood(reqs)
    for r, (loss, greedy) in zip(reqs, got):
        ctx, cont = r.args[0], r.args[1]
        prompt = lm.prompt(ctx, 1)
        inputs = lm.processor(images=_visual(lm.task_dict["t"]["test"][r.args[3]]), text=[prompt + cont],
                              return_tensors="pt")
        n = len(lm.tokenizer(prompt + cont)["input_ids"]) - len(lm.tokenizer(prompt)["input_ids"])
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -n:] = inputs["input_ids"][:, -n:]
        with torch.no_grad():
            out = lm.model(**inputs, labels=labels)
        assert loss == pytest.approx(float(out.loss), abs=1e-5)
        pred = out.logits[0, -n - 1:-1].argmax(-1)
        assert greedy == bool((pred == inputs["input_ids"][0, -n:]).all())
        assert vtprune.last_report(lm.model).visual_after == KEEP
    assert lm.stats.samples == len(reqs) and lm.stats.visual_after == KEEP * len(reqs)


def test_generate_until_batched_equals_single_and_honours_gen_kwargs(ckpts):
    gk = {"max_new_tokens": 5, "temperature": 0, "until": []}
    lm = _lm(ckpts["qwen2_vl"], method="uniform", keep=KEEP, batch_size=4)
    batched = lm.generate_until(_gen_requests(gk))
    lm.batch_size_per_gpu = 1
    single = lm.generate_until(_gen_requests(gk))
    assert [r.text for r in batched] == [r.text for r in single]
    for r in batched:
        assert 1 <= r.token_counts.output_tokens <= 5
        assert r.token_counts.vtprune["visual_tokens_after"] == KEEP
    assert {r.token_counts.vtprune["batch_size"] for r in batched} == {4}
    # `until`: a stop string cuts the text before it
    text = batched[0].text
    stop = text[len(text) // 2:][:2]
    cut = lm.generate_until(_gen_requests({**gk, "until": [stop]}))[0].text
    assert stop and cut == text.split(stop)[0]


def test_keep_all_equals_method_none(ckpts):
    """A budget ≥ the image's tokens runs exactly as the unpruned model; method=none is that model."""
    gk = {"max_new_tokens": 4, "temperature": 0}
    none = _lm(ckpts["llava"], method="none", batch_size=2)
    keep_all = _lm(ckpts["llava"], method="random", keep=10_000, batch_size=2)
    assert [r.text for r in none.generate_until(_gen_requests(gk))] == \
        [r.text for r in keep_all.generate_until(_gen_requests(gk))]
    assert none.loglikelihood(_ll_requests()) == keep_all.loglikelihood(_ll_requests())
    assert none.stats.visual_after == none.stats.visual_before == keep_all.stats.visual_after > 0


def test_clean_logs_statistics_into_lmms_eval_throughput(ckpts):
    from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics, summarize_logged_metrics

    reset_logged_metrics()
    lm = _lm(ckpts["llava"], method="divprune", keep=4)
    lm.generate_until(_gen_requests({"max_new_tokens": 2}))
    lm.clean()
    summary = summarize_logged_metrics()
    assert summary["avg_vtprune_visual_tokens_after"] == 4 and summary["avg_vtprune_samples"] == len(_docs())
    assert lm.last_summary["vtprune_visual_tokens_after"] == 4
    assert not hasattr(lm, "_model")  # freed, as lmms-eval's own models do


# ---- argument handling -------------------------------------------------------------------------------------------
def test_build_prune_config():
    assert build_prune_config("none") is None
    cfg = build_prune_config(None, stages='[{"method": "divprune", "keep": 8}]', positions="compact", seed=2)
    assert cfg.to_dict() == {"stages": [{"method": "divprune", "keep": 8}], "positions": "compact", "seed": 2}
    assert build_prune_config("uniform", keep_ratio=0.25).to_dict()["stages"] == [{"method": "uniform",
                                                                                    "keep_ratio": 0.25}]
    with pytest.raises(ValueError, match="not both"):
        build_prune_config("divprune", keep=8, stages="[]")
    with pytest.raises(ValueError, match="stages must be a JSON list"):
        build_prune_config(None, stages="[{oops")
    with pytest.raises(ValueError, match=r"unknown model_args \['keep2'\] for method=none"):
        build_prune_config("none", keep2=3)
    with pytest.raises(ValueError, match="needs method=<name>"):
        build_prune_config(None, keep=8)


def test_import_vtprune_does_not_import_lmms_eval():
    code = "import sys, vtprune, vtprune.integrations; assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- CLI: runs, statistics, errors -------------------------------------------------------------------------------
def test_entry_point_registered():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="lmms_eval.models") if e.name == "vtprune"]
    assert eps, "vtprune is not registered in the lmms_eval.models entry-point group: pip install -e '.[eval]'"
    (manifest,) = eps[0].load()()
    assert manifest.model_id == "vtprune" and manifest.simple_class_path.endswith("lmms_eval.VTPruneLMM")


def test_cli_llava_divprune(runs, ckpts):
    _check_run(runs["llava_divprune"].result(), ckpts["llava"],
               {"stages": [{"method": "divprune", "keep": KEEP}], "positions": "preserve", "seed": 0}, KEEP)


def test_cli_llava_none_is_the_unpruned_model(runs, ckpts):
    none = runs["llava_none"].result()
    res = _check_run(none, ckpts["llava"], {"method": "none"}, None)
    assert "method=none" in res["config"]["model_args"]
    # pruning changed what the model saw: the log-likelihoods of the pruned run differ from the unpruned ones
    pruned = _mc_losses(runs["llava_divprune"].result())
    assert any(abs(a - b) > 1e-4 for d in pruned for a, b in zip(pruned[d], _mc_losses(none)[d]))


def test_cli_qwen_fastervlm_stages_json(runs, ckpts):
    _check_run(runs["qwen_fastervlm"].result(), ckpts["qwen2_vl"],
               {"stages": [{"method": "fastervlm", "keep": KEEP}], "positions": "preserve", "seed": 3}, KEEP)


def test_cli_two_processes_equal_one(runs):
    one, two = runs["llava_divprune"].result(), runs["llava_divprune_2proc"].result()
    assert "Running on rank 1" in two.log, "the two-process run did not start a second rank:\n" + two.log[-3000:]
    r1, r2 = one.results(), two.results()
    for task in ("vtprune_synth", "vtprune_synth_mc"):
        assert r1["results"][task]["acc,none"] == r2["results"][task]["acc,none"]
        s1, s2 = one.samples(task), two.samples(task)
        assert sorted(s1) == sorted(s2) == list(range(LIMIT))  # every doc once: the ranks' shards were merged
    g1, g2 = one.samples("vtprune_synth"), two.samples("vtprune_synth")
    assert all(g1[d]["filtered_resps"] == g2[d]["filtered_resps"] for d in g1)
    # other shards mean other batches, hence other left padding: equal up to float rounding
    m1, m2 = _mc_losses(one), _mc_losses(two)
    assert all(a == pytest.approx(b, abs=1e-5) for d in m1 for a, b in zip(m1[d], m2[d], strict=True))
    st1, st2 = _stats(r1), _stats(r2)
    for k in st1:
        if k != "prefill_ms":  # timings differ; everything counted must not (ranks' statistics are summed)
            assert st1[k] == st2[k], k


@pytest.mark.parametrize("name,text", [
    ("bad_method", "vtprune lmms-eval model: unknown method 'bogus'; valid choices: "),
    ("bad_keep", "vtprune lmms-eval model: keep must be an int ≥ 1 (visual tokens per image), got -3"),
    ("bad_model", "unsupported model family 'fuyu'; supported model_type values: "
                  + ", ".join(vtprune.supported_models())),
])
def test_cli_bad_model_args_show_vtprune_error(runs, name, text):
    run = runs[name].result()
    assert text in run.log, run.log[-3000:]
    assert "Error during evaluation" in run.log
    assert not glob.glob(str(run.out / "**" / "*_results.json"), recursive=True)
