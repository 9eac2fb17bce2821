"""The lmms-eval plugin (``--model vtprune`` wrapping lmms-eval's own model classes, and ``vtprune_hf``): real CLI
runs on saved tiny checkpoints, in-process checks of ``generate_until`` / ``loglikelihood`` against independent
references, and ``method=none`` == ``--model <base>`` per sample.

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
from typing import Any

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional `eval` extra: pip install -e '.[eval]'")

from lmms_eval.api.instance import Instance  # noqa: E402

import vtprune  # noqa: E402
from vtprune.integrations.lmms_eval import VTPrune, build_prune_config  # noqa: E402
from vtprune.integrations.lmms_hf import load_processor  # noqa: E402
from vtprune.testing import tiny_llava, tiny_qwen2_vl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "evals" / "tasks"
TASK_DIR = TASKS / "vtprune_synth"
GEN, MC = "vtprune_synth224_attribute", "vtprune_synth224_mc_attribute"  # colour questions: five choices each
LIMIT = 6
N_CHOICES = 5
REQUESTS = LIMIT + LIMIT * N_CHOICES  # generation requests + one log-likelihood request per choice
KEEP = 8
HUB_TASK_YAML = """task: vtprune_hub_task
dataset_path: nosuch-org/nosuch-dataset
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
metric_list:
  - metric: exact_match
"""


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


def _cli(workdir: Path, model_args: str, processes: int = 1, tasks: str = f"{GEN},{MC}",
         include: Path = TASKS) -> Run:
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
    cmd = [*launch, "--model", "vtprune", "--model_args", model_args, "--tasks", tasks, "--include_path", str(include),
           "--limit", str(LIMIT), "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    return Run(out, proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory) -> dict[str, Future]:
    """All CLI runs of this module, started at once, two at a time; a test waits for the ones it reads."""
    llava, qwen = ckpts["llava"], ckpts["qwen2_vl"]
    hf = "base=vtprune_hf,"  # the multiple-choice task needs a base with loglikelihood
    specs = {  # longest first
        "llava_divprune_2proc": (f"{hf}pretrained={llava},method=divprune,keep={KEEP}", 2),
        "llava_divprune": (f"{hf}pretrained={llava},method=divprune,keep={KEEP}", 1),
        "llava_none": (f"{hf}pretrained={llava},method=none", 1),
        # a whole stage list as one JSON value (lmms-eval splits model_args on commas outside brackets/quotes)
        "qwen_fastervlm": (f'{hf}pretrained={qwen},stages=[{{"method":"fastervlm","keep":{KEEP}}}],seed=3', 1),
        "bad_method": (f"pretrained={llava},method=bogus,keep=8", 1),
        "bad_keep": (f"pretrained={llava},method=divprune,keep=-3", 1),
        "bad_model": (f"pretrained={ckpts['fuyu']},method=divprune,keep=8", 1),
        "bad_base": (f"base=nosuch,pretrained={llava},method=divprune,keep=8", 1),
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_cli, tmp_path_factory.mktemp(name), args, procs, GEN if name.startswith("bad")
                                 else f"{GEN},{MC}") for name, (args, procs) in specs.items()}
    # a task on a hub dataset that is not cached, under HF_DATASETS_OFFLINE=1 (set by _cli)
    hub = tmp_path_factory.mktemp("hub_task")
    (hub / "hub_task.yaml").write_text(HUB_TASK_YAML)
    futures["missing_dataset"] = pool.submit(_cli, tmp_path_factory.mktemp("missing"),
                                             f"pretrained={llava},method=divprune,keep=8", 1, "vtprune_hub_task", hub)
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
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    proc = load_processor(str(ckpt))
    token = "<image>" if cfg.model_type == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    img = _visual(_docs()[0])[0]
    ids = proc(images=[img], text=[f"{token} what?"], return_tensors="pt")["input_ids"]
    return int((ids == cfg.image_token_id).sum())


def _stats(res: dict) -> dict:
    tp = res.get("throughput") or {}
    stats = {k[len("avg_vtprune_"):]: v for k, v in tp.items() if k.startswith("avg_vtprune_")}
    assert stats, f"no vtprune statistics in the results' throughput block: {tp}"
    return stats


def _check_run(run: Run, ckpt: Path, expected_config: dict, budget: int | None, world_size: int = 1) -> dict:
    res = run.results()
    for task in (GEN, MC):
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
    assert st["world_size"] == world_size and st["cuda"] == 0.0
    assert "vtprune run: " in run.log and json.dumps(expected_config) in run.log  # full config in the log
    # per sample: the full config, base, device and world size ride on lmms-eval's token_counts
    for s in run.samples(GEN).values():
        tc = s["token_counts"][0]
        assert tc["vtprune"] == {"config": expected_config, "base": "vtprune_hf", "model": str(ckpt), "device": "cpu",
                                 "world_size": world_size}
        assert 1 <= tc["output_tokens"] <= 8  # the task's max_new_tokens
    return res


def _mc_losses(run: Run) -> dict[int, list[float]]:
    import ast

    return {d: [ast.literal_eval(r)[0] if isinstance(r, str) else r[0] for r in s["filtered_resps"]]
            for d, s in run.samples(MC).items()}


# ---- in process: the model class against independent references ---------------------------------------------------
def _docs() -> list[dict]:
    rows = [json.loads(line) for line in (TASK_DIR / "heldout.jsonl").read_text().splitlines()]
    return [r for r in rows if r["qtype"] == "attribute"][:4]


def _visual(doc: dict) -> list:
    from vtprune.synth import item

    return [item("heldout", doc["index"], size=224).image]


def _lm(ckpt: Path, **kw) -> VTPrune:
    lm = VTPrune(pretrained=str(ckpt), base="vtprune_hf", device="cpu", **kw)
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
    assert lm.base.model is lm.model and vtprune.is_pruned(lm.model)  # pruned in place, inside lmms-eval's object
    reqs = _ll_requests()
    got = lm.loglikelihood(reqs)
    for r, (loss, greedy) in zip(reqs, got):
        ctx, cont = r.args[0], r.args[1]
        prompt = lm.base.prompt(ctx, 1)
        inputs = lm.base.processor(images=_visual(lm.task_dict["t"]["test"][r.args[3]]), text=[prompt + cont],
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
    # the wrapper counted the plugin's batched forwards (3 + 3 + 2 requests), not the reference calls above...
    assert lm.stats.calls == 3 + len(reqs) and lm.stats.samples == 2 * len(reqs)
    assert lm.stats.visual_after == KEEP * lm.stats.images


def test_generate_until_batched_equals_single_and_honours_gen_kwargs(ckpts):
    gk = {"max_new_tokens": 5, "temperature": 0, "until": []}
    lm = _lm(ckpts["qwen2_vl"], method="uniform", keep=KEEP, batch_size=4)
    batched = lm.generate_until(_gen_requests(gk))
    lm.base.batch_size_per_gpu = 1
    single = lm.generate_until(_gen_requests(gk))
    assert [r.text for r in batched] == [r.text for r in single]
    for r in batched:
        assert 1 <= r.token_counts.output_tokens <= 5
        assert r.token_counts.vtprune["config"]["stages"] == [{"method": "uniform", "keep": KEEP}]
    assert lm.stats.visual_after == KEEP * lm.stats.images and lm.stats.calls == 1 + 4
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
    assert none.stats.images == keep_all.stats.images == len(_docs()) + len(_ll_requests())


def test_clean_logs_statistics_and_restores_the_model(ckpts):
    from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics, summarize_logged_metrics

    reset_logged_metrics()
    lm = _lm(ckpts["llava"], method="divprune", keep=4)
    model = lm.model
    assert "generate" in vars(model)
    lm.generate_until(_gen_requests({"max_new_tokens": 2}))
    lm.clean()
    summary = summarize_logged_metrics()
    assert summary["avg_vtprune_visual_tokens_after"] == 4 and summary["avg_vtprune_samples"] == len(_docs())
    assert summary["avg_vtprune_world_size"] == 1
    assert lm.last_summary["vtprune_visual_tokens_after"] == 4
    assert not model._forward_hooks or all("VTPrune" not in repr(h) for h in model._forward_hooks.values())
    assert vars(model)["generate"].__class__.__name__ == "_Generate"  # vtprune's own, the wrapper's is gone
    assert not hasattr(lm.base, "_model")  # freed, as lmms-eval's own models do


# ---- method=none is lmms-eval's own class, sample for sample --------------------------------------------------------
def _evaluate(model: Any, model_args: str, tasks: list[str], limit: int, force_simple: bool = False) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, log_samples=True,
                           task_manager=TaskManager(include_path=str(TASKS)), force_simple=force_simple)


def _responses(res: dict) -> dict[tuple[str, int], list]:
    return {(t, s["doc_id"]): s["filtered_resps"] for t, ss in res["samples"].items() for s in ss}


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_method_none_equals_lmms_eval_llava_hf(force_simple, monkeypatch, tmp_path):
    """``--model vtprune --model_args base=llava_hf,method=none`` answers every sample exactly as ``--model
    llava_hf`` (chat and simple class) on the shipped demo LLaVA (its chat template is what makes llava_hf usable on
    it). Pruned, the same base gives other answers on some sample. (llava_hf's own ``loglikelihood`` fails on
    transformers 5 — it calls the processor on a prompt with an image token and no image — so no multiple choice.)"""
    from vtprune.demo_models import model_dir

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    tasks = [GEN]
    direct = _evaluate("llava_hf", f"pretrained={model_dir('llava')},device=cpu,device_map=cpu", tasks, 4,
                       force_simple)
    wrapped = _evaluate("vtprune", "base=llava_hf,pretrained=vtprune:llava,method=none", tasks, 4, force_simple)
    assert wrapped["config"]["model_backend"].endswith(f"VTPrune{'' if force_simple else 'Chat'} "
                                                       f"({'simple' if force_simple else 'chat'})")
    assert _responses(direct) == _responses(wrapped)
    assert direct["results"][GEN]["acc,none"] == wrapped["results"][GEN]["acc,none"] == 1.0
    if not force_simple:
        pruned = _evaluate("vtprune", "base=llava_hf,pretrained=vtprune:llava,method=random,keep=2", tasks, 4)
        assert _responses(pruned) != _responses(direct)
        assert pruned["throughput"]["avg_vtprune_visual_tokens_after"] == 2


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
    manifest, hf = eps[0].load()()
    assert manifest.model_id == "vtprune" and manifest.simple_class_path.endswith("lmms_eval.VTPrune")
    assert manifest.chat_class_path.endswith("lmms_eval.VTPruneChat")
    assert hf.model_id == "vtprune_hf"


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


def test_cli_two_processes_equal_one(runs, ckpts):
    one, two = runs["llava_divprune"].result(), runs["llava_divprune_2proc"].result()
    assert "Running on rank 1" in two.log, "the two-process run did not start a second rank:\n" + two.log[-3000:]
    r1, r2 = one.results(), two.results()
    for task in (GEN, MC):
        assert r1["results"][task]["acc,none"] == r2["results"][task]["acc,none"]
        s1, s2 = one.samples(task), two.samples(task)
        assert sorted(s1) == sorted(s2) == list(range(LIMIT))  # every doc once: the ranks' shards were merged
    g1, g2 = one.samples(GEN), two.samples(GEN)
    assert all(g1[d]["filtered_resps"] == g2[d]["filtered_resps"] for d in g1)
    # other shards mean other batches, hence other left padding: equal up to float rounding
    m1, m2 = _mc_losses(one), _mc_losses(two)
    assert all(a == pytest.approx(b, abs=1e-5) for d in m1 for a, b in zip(m1[d], m2[d], strict=True))
    st1, st2 = _stats(r1), _stats(r2)
    assert st1["world_size"] == 1 and st2["world_size"] == 2  # the results record the processes
    _check_run(two, ckpts["llava"], {"stages": [{"method": "divprune", "keep": KEEP}], "positions": "preserve",
                                     "seed": 0}, KEEP, world_size=2)
    for k in st1:
        # timings and the number of model calls (batches) differ with the shards; everything counted per sample or
        # image must not (ranks' statistics are summed)
        if k not in ("prefill_ms", "calls", "world_size"):
            assert st1[k] == st2[k], k


@pytest.mark.parametrize("name,text", [
    ("bad_method", "vtprune lmms-eval model: unknown method 'bogus'; valid choices: "),
    ("bad_keep", "vtprune lmms-eval model: keep must be an int ≥ 1 (visual tokens per image), got -3"),
    ("bad_model", "unsupported model family 'fuyu'; supported model_type values: "
                  + ", ".join(vtprune.supported_models())),
    ("bad_base", "vtprune lmms-eval model: unknown base 'nosuch'; lmms-eval models: "),
])
def test_cli_bad_model_args_show_vtprune_error(runs, name, text):
    run = runs[name].result()
    assert text in run.log, run.log[-3000:]
    assert "Error during evaluation" in run.log
    assert not glob.glob(str(run.out / "**" / "*_results.json"), recursive=True)


def test_missing_datasets_expands_groups(monkeypatch, tmp_path):
    """Groups are followed to their tasks: the bundled group reads local files (nothing missing); a group over a task
    on an uncached hub dataset names that task."""
    from vtprune.integrations.lmms_eval import missing_datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert missing_datasets(["vtprune_synth224", "vtprune_synth448_mc"], TASKS) == []
    (tmp_path / "hub_task.yaml").write_text(HUB_TASK_YAML)
    (tmp_path / "hub_group.yaml").write_text("group: vtprune_hub_group\ntask:\n  - vtprune_hub_task\n")
    assert missing_datasets(["vtprune_hub_group"], tmp_path) == [("vtprune_hub_task", "nosuch-org/nosuch-dataset")]


def test_cli_offline_missing_dataset_is_named_before_the_model_loads(runs):
    run = runs["missing_dataset"].result()
    assert ("task 'vtprune_hub_task' needs dataset 'nosuch-org/nosuch-dataset'" in run.log
            and "not in the local cache" in run.log), run.log[-3000:]
    assert "Loading weights" not in run.log and "vtprune: " not in run.log.replace("vtprune lmms-eval model:", "")
    assert not glob.glob(str(run.out / "**" / "*_results.json"), recursive=True)


def _images_only_process_vision_info(messages: list, **kw) -> tuple:
    """Stand-in for ``qwen_vl_utils.process_vision_info`` (which imports torchvision, absent here): the PIL images of
    the messages in order, no video. Both runs of the Qwen test below use it, so it cannot make them differ."""
    images = [c["image"] for conv in messages for m in conv if isinstance(m.get("content"), list)
              for c in m["content"] if c.get("type") == "image"]
    out = (images or None, None)
    return (*out, {}) if kw.get("return_video_kwargs") else out


def test_method_none_equals_lmms_eval_qwen2_5_vl(monkeypatch, tmp_path):
    """``--model vtprune --model_args base=qwen2_5_vl,method=none`` == lmms-eval's own ``qwen2_5_vl`` chat class,
    sample for sample, on a tiny Qwen2.5-VL. The reference gets the checkpoint's processor (``AutoProcessor`` cannot
    build a Qwen processor without torchvision; the wrapper does the same fix-up) and both get an images-only
    ``process_vision_info``."""
    import lmms_eval.models.chat.qwen2_5_vl as chat_qwen
    from lmms_eval.models import get_model

    from vtprune.integrations.lmms_eval import _fix_processor

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(chat_qwen, "process_vision_info", _images_only_process_vision_info)
    model, proc = tiny_qwen2_vl("qwen2_5_vl")
    # lmms-eval's Qwen classes need a chat template; the demo Qwen2-VL's is a Qwen layout over the same specials
    from vtprune.demo_models import model_dir

    proc.chat_template = (model_dir("qwen2_vl") / "chat_template.jinja").read_text()
    model.save_pretrained(tmp_path / "q")
    proc.save_pretrained(tmp_path / "q")
    cls = get_model("qwen2_5_vl")
    assert cls is chat_qwen.Qwen2_5_VL
    ref = cls(pretrained=str(tmp_path / "q"), device="cpu", device_map="cpu")
    _fix_processor(ref, str(tmp_path / "q"))
    direct = _evaluate(ref, "", [GEN], 3)
    wrapped = _evaluate("vtprune", f"base=qwen2_5_vl,pretrained={tmp_path / 'q'},method=none", [GEN], 3)
    assert _responses(direct) == _responses(wrapped) and len(_responses(direct)) == 3
    assert wrapped["throughput"]["avg_vtprune_visual_tokens_after"] > 0
