"""lmms-eval 0.7.x model ``vtprune``: lmms-eval's own model class for the checkpoint, with its model pruned in place.

    lmms-eval --model vtprune \\
        --model_args base=llava_hf,pretrained=<dir, hub id or vtprune:llava>,method=divprune,keep=64 \\
        --tasks <tasks> --output_path out/ --log_samples
    accelerate launch --num_processes 2 -m lmms_eval --model vtprune ...      # data parallel, same metric

``--model vtprune`` builds the registered lmms-eval model ``base`` exactly as ``--model <base>`` would (same class,
same arguments, so the same prompts, chat formatting, batching and decoding), then calls ``vtprune.prune`` on the
transformers model inside it (accelerate/DDP wrappers unwrapped). ``method=none`` leaves it unpruned, so its
per-sample outputs are those of ``--model <base>``: a vtprune row sits next to a published lmms-eval row.

Like lmms-eval, ``--model vtprune`` resolves to a chat class by default and to a simple class under
``--force_simple``; the base resolves the same way, and when it has only a simple class (``qwen2_vl``,
``vtprune_hf``) the run is a simple one, as ``--model <base>`` would be. Multiple-choice (log-likelihood) tasks need
a simple base with ``loglikelihood``: ``llava_hf`` under ``--force_simple``, or ``vtprune_hf`` (any family).

On a CPU-only machine add ``--multi_gpu`` to ``accelerate launch`` (without it accelerate silently starts one
process; with it, torchrun-style processes and a gloo group) and set ``OMP_NUM_THREADS``; ``examples/lmms_eval_run.sh``
has both commands.

Registration: lmms-eval 0.7.x resolves ``--model`` names through its ``ModelRegistryV2``, which reads the
``lmms_eval.models`` entry-point group; vtprune's ``pyproject.toml`` points it at :func:`lmms_manifests`.

``--model_args`` (comma separated; a value may be JSON):

* ``base``: the lmms-eval model id to wrap (``llava_hf``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``,
  ``internvl_hf``, ``llava_onevision``, ``huggingface``, ``vtprune_hf``, ...). Default per model family:
  :data:`DEFAULT_BASE` (``llava`` -> ``llava_hf``), else ``vtprune_hf``.
* ``pretrained``: a local directory, a hub id, or ``vtprune:llava`` / ``vtprune:qwen2_vl`` (the shipped demo models).
* ``method``: a vtprune method (``vtprune.list_methods()``) or ``none`` (unpruned: the sweep baseline;
  ``keep``/``keep_ratio``/``positions``/``seed`` are then accepted and ignored, so one template serves every
  method). Required.
* ``keep`` / ``keep_ratio`` / ``positions`` / ``seed`` and selector options: as in ``vtprune.prune``;
  ``stages``: a whole stage list as JSON (``stages=[{"method":"divprune","keep":64}]``) instead.
* every other argument goes to the base class, as with ``--model <base>``. Defaults the wrapper fills in when the
  base takes them and they are not given: ``device`` = ``cuda`` if available, else ``cpu``, and on CPU
  ``device_map=cpu`` (lmms-eval's classes default to CUDA).

Where the results land (lmms-eval 0.7.3 has no field for model metadata in the results JSON, so vtprune uses the
channels it has for models):

* results JSON, ``"throughput"``: one ``log_metrics`` record written by rank 0 with the statistics of **all** ranks
  (gathered in :meth:`VTPrune.clean`); lmms-eval prefixes each key with ``avg_``: ``avg_vtprune_visual_tokens_before``
  / ``_after`` (visual tokens per image entering the LLM, unpruned / pruned), ``avg_vtprune_visual_tokens_per_layer``
  (averaged over the LLM's decoder layers; equals ``after`` for ``pre_llm`` pruning), ``avg_vtprune_llm_input_tokens``
  (per sample), ``avg_vtprune_prefill_ms`` (mean per model call: vision encoding + selection + LLM prefill, i.e. time
  to first token), ``avg_vtprune_images``, ``avg_vtprune_samples``, ``avg_vtprune_calls``,
  ``avg_vtprune_world_size`` (processes) and ``avg_vtprune_cuda`` (1 on GPU, 0 on CPU).
* samples JSONL (``--log_samples``), every generated sample's ``"token_counts"`` -> ``"vtprune"``: the full
  ``PruneConfig.to_dict()``, base, device and world size.
* the log: rank 0 logs one ``vtprune run: {...}`` line with all of the above.

Pre-flight: under lmms-eval's command line with ``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``), a task whose hub
dataset is not in the local cache is named (with its dataset) before any weights load (:func:`preflight`).
"""

from __future__ import annotations

import contextvars
import inspect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

import vtprune
from vtprune.config import PruneConfig
from vtprune.integrations import lmms_hf
from vtprune.integrations.lmms_hf import process_ranks, resolve_pretrained

MODEL_ID = "vtprune"
CLASS_PATH = f"{__name__}.VTPrune"
CHAT_CLASS_PATH = f"{__name__}.VTPruneChat"

#: lmms-eval model wrapped when ``base`` is not given, by ``model_type``; other families get ``vtprune_hf``. Only
#: pairs verified here: lmms-eval's Qwen-VL classes import ``qwen_vl_utils``, which needs torchvision (absent on
#: CPU-only installs), so Qwen families default to ``vtprune_hf``; pass ``base=qwen2_5_vl`` etc. where it imports.
DEFAULT_BASE: dict[str, str] = {"llava": "llava_hf"}
_PRUNE_ARGS = ("method", "keep", "keep_ratio", "positions", "seed", "stages")


def lmms_manifests() -> list[Any]:
    """Entry-point payload for lmms-eval's ``lmms_eval.models`` group: ``--model vtprune`` and ``vtprune_hf``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, chat_class_path=CHAT_CLASS_PATH),
            ModelManifest(model_id=lmms_hf.MODEL_ID, simple_class_path=lmms_hf.CLASS_PATH)]


@dataclass
class PruneStats:
    """Running sums of one run's pruning statistics (summed, so ranks merge by addition)."""

    calls: int = 0  # model calls with at least one image (generate calls, log-likelihood forwards)
    samples: int = 0
    images: int = 0
    visual_before: float = 0.0  # visual tokens of the counted images as the unpruned model lays them out
    visual_after: float = 0.0  # ... entering the LLM after pruning
    visual_per_layer: float = 0.0  # per sample: visual tokens averaged over the LLM's decoder layers
    llm_tokens: float = 0.0  # tokens the LLM attends in prefill (text + kept visual, no padding)
    prefill_ms: float = 0.0

    def add(self, other: PruneStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict[str, float]:
        """Per-image / per-sample / per-call means (the numbers a results file should show)."""
        per_img = max(self.images, 1)
        return {
            "vtprune_visual_tokens_before": self.visual_before / per_img,
            "vtprune_visual_tokens_after": self.visual_after / per_img,
            "vtprune_visual_tokens_per_layer": self.visual_per_layer / per_img,
            "vtprune_llm_input_tokens": self.llm_tokens / max(self.samples, 1),
            "vtprune_prefill_ms": self.prefill_ms / max(self.calls, 1),
            "vtprune_images": float(self.images),
            "vtprune_samples": float(self.samples),
            "vtprune_calls": float(self.calls),
        }


@dataclass
class VTPruneTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus the run's vtprune facts (``"vtprune"`` key of ``token_counts`` in
    the samples JSONL)."""

    vtprune: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().to_dict()
        if self.vtprune is not None:
            d["vtprune"] = self.vtprune
        return d


def _bad(msg: str) -> ValueError:
    return ValueError(f"vtprune lmms-eval model: {msg}")


def build_prune_config(method: str | None, keep: Any = None, keep_ratio: Any = None, positions: str = "preserve",
                       seed: Any = 0, stages: Any = None, **options: Any) -> PruneConfig | None:
    """``--model_args`` -> a validated ``PruneConfig`` (``None`` for ``method=none``); vtprune's own ``ValueError``
    text names the bad value and the valid choices. Runs before any weights load, so bad arguments fail fast."""
    if stages is not None:
        if method is not None:
            raise _bad("give either method=/keep=/... or stages=<JSON list>, not both")
        if isinstance(stages, str):
            try:
                stages = json.loads(stages)
            except json.JSONDecodeError as e:
                raise _bad(f"stages must be a JSON list of stage dicts, got {stages!r} ({e})") from None
        try:
            return PruneConfig.from_dict({"stages": stages, "positions": positions, "seed": seed, **options}).validate()
        except ValueError as e:
            raise _bad(str(e)) from None
    if method is None:
        raise _bad("model_args needs method=<name>: one of " + ", ".join(vtprune.list_methods())
                   + ", or none (the unpruned model)")
    if str(method).lower() == "none":
        if options:
            raise _bad(f"unknown model_args {sorted(options)} for method=none (not vtprune's "
                       f"{', '.join(_PRUNE_ARGS)} nor an argument of the base model)")
        return None
    d = {"method": method, "keep": keep, "keep_ratio": keep_ratio, **options}
    d = {k: v for k, v in d.items() if v is not None}
    try:
        return PruneConfig.from_dict({**d, "positions": positions, "seed": seed}).validate()
    except ValueError as e:
        raise _bad(str(e)) from None


def base_class(name: str, force_simple: bool) -> type:
    """lmms-eval's class for ``--model <name>`` (chat preferred unless ``force_simple``, as the CLI resolves it)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    if name == MODEL_ID:
        raise _bad("base=vtprune would wrap itself; name an lmms-eval model (e.g. llava_hf, qwen2_5_vl, vtprune_hf)")
    if name not in MODEL_REGISTRY_V2.list_model_names():
        known = ", ".join(MODEL_REGISTRY_V2.list_canonical_model_ids())
        raise _bad(f"unknown base {name!r}; lmms-eval models: {known}")
    return MODEL_REGISTRY_V2.get_model_class(name, force_simple=force_simple)


def _init_params(cls: type) -> set[str] | None:
    """Names ``cls.__init__`` takes; None if it takes any keyword (``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "self"}


def hf_model(lm: Any) -> torch.nn.Module:
    """The transformers model inside an lmms-eval model object, without accelerate/DDP wrappers (``.module``)."""
    from transformers import PreTrainedModel

    for attr in ("model", "_model"):
        m = getattr(lm, attr, None)
        while isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        if isinstance(m, PreTrainedModel):
            return m
    raise _bad(f"{type(lm).__name__} holds no transformers model in .model / ._model; vtprune cannot prune it")


def _fix_processor(lm: Any, pretrained: str) -> None:
    """Give a base the checkpoint's processor where ``AutoProcessor`` handed it only a tokenizer.

    Qwen-VL, InternVL and other processors build a video processor that needs torchvision; checkpoints saved
    without it (``vtprune.processors``' image-only classes, the shipped ``qwen2_vl`` demo) name a class
    ``AutoProcessor`` does not know, and it silently returns the tokenizer, which then fails on the first image.
    """
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    for attr in ("processor", "_processor", "_image_processor"):
        cur = getattr(lm, attr, None)
        if isinstance(cur, PreTrainedTokenizerBase) and not isinstance(cur, ProcessorMixin):
            proc = lmms_hf.load_processor(pretrained)
            proc.tokenizer.padding_side = cur.padding_side
            setattr(lm, attr, proc)


#: ``dataset_path`` values that name a local builder of ``datasets`` (read files named in the task), not a hub dataset
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "imagefolder", "audiofolder", "videofolder",
                             "webdataset", "pandas", "sql", "xml", "generator"})


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE",
                                                                                       "HF_HUB_OFFLINE"))


def _dataset_cached(path: str) -> bool:
    from datasets import config as dcfg
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(dcfg.HF_DATASETS_CACHE) / path.replace("/", "___")).exists() or \
        (Path(HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}").exists()


def missing_datasets(tasks: list[str], include_path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(task, dataset_path)`` of every task (groups and tags expanded) whose hub dataset is not in the local cache,
    when ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set (online, lmms-eval can download it: nothing is missing).
    Unknown task names are left to lmms-eval's own error."""
    if not _offline():
        return []
    from lmms_eval import utils
    from lmms_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path) if include_path else None)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    todo = list(tasks)
    while todo:
        name = todo.pop(0)
        entry = tm.task_index.get(name)
        if name in seen or entry is None:
            continue
        seen.add(name)
        yaml_path = entry.get("yaml_path", -1)
        cfg = utils.load_yaml_config(yaml_path, mode="simple") if yaml_path != -1 else {}
        if entry.get("type") in ("group", "tag") or "group" in cfg:
            # a tag's index entry lists its tasks; a group's (an int placeholder there) are in its YAML
            subtasks = entry.get("task") if isinstance(entry.get("task"), list) else cfg.get("task", [])
            todo += [t if isinstance(t, str) else t.get("task") for t in subtasks or []
                     if isinstance(t, str) or isinstance(t, dict) and isinstance(t.get("task"), str)]
            continue
        path = cfg.get("dataset_path")
        if not path or path in _LOCAL_BUILDERS or Path(str(path)).exists():
            continue
        if not _dataset_cached(str(path)):
            out.append((name, str(path)))
    return out


def preflight(tasks: list[str], include_path: str | Path | None = None) -> None:
    """Raise a ``ValueError`` naming every task whose dataset an offline run cannot load (see
    :func:`missing_datasets`), before any model weights are loaded."""
    missing = missing_datasets(tasks, include_path)
    if missing:
        from datasets import config as dcfg

        rows = "; ".join(f"task {t!r} needs dataset {d!r}" for t, d in missing)
        raise _bad(f"offline run (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set) and not in the local cache "
                   f"({dcfg.HF_DATASETS_CACHE}): {rows}. Download it once online (or point HF_HOME at a cache that "
                   "has it), or unset the offline variables")


def _cli_option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _preflight_from_command_line() -> None:
    # lmms-eval builds the model before it loads any task, and hands the model no task names: under its command line
    # (`lmms_eval ... --tasks ...`) they are read from argv, so a missing dataset is named before weights load
    tasks = _cli_option(sys.argv, "--tasks")
    if tasks:
        preflight([t for t in tasks.split(",") if t], _cli_option(sys.argv, "--include_path"))


@dataclass
class _Call:
    """One model call being timed (held in a context variable, never on the model or the wrapper)."""

    t0: float
    kind: str  # "generate" or "forward"
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    before: Any = None  # vtprune's report before this call (a fresh one afterwards means this call was pruned)
    prefill_ms: float | None = None
    token: contextvars.Token | None = None


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("vtprune_lmms_call", default=None)


class VTPrune(lmms):
    """lmms-eval model wrapping lmms-eval's own class ``base``; its transformers model pruned by vtprune."""

    is_simple = True

    def __init__(self, pretrained: str, base: str | None = None, method: str | None = None, keep: Any = None,
                 keep_ratio: Any = None, positions: str = "preserve", seed: Any = 0, stages: Any = None,
                 **kwargs: Any) -> None:
        super().__init__()
        from transformers import AutoConfig

        _preflight_from_command_line()
        pretrained = resolve_pretrained(pretrained)
        model_type = AutoConfig.from_pretrained(pretrained).model_type
        self.base_name = base or DEFAULT_BASE.get(model_type, lmms_hf.MODEL_ID)
        cls = base_class(self.base_name, force_simple=self.is_simple)
        accepted = _init_params(cls)
        base_kw = {k: v for k, v in kwargs.items() if accepted is None or k in accepted}
        options = {k: v for k, v in kwargs.items() if k not in base_kw}
        # everything that can be wrong with the arguments fails here, before any weights load
        self.prune_config = build_prune_config(method, keep, keep_ratio, positions, seed, stages, **options)
        if self.prune_config is not None:
            from vtprune.registry import get_adapter_class

            try:
                get_adapter_class(model_type)  # the library's own "unsupported model family" error, early
            except ValueError as e:
                raise _bad(f"{pretrained}: {e}") from None
        for k, v in self._device_defaults(base_kw).items():
            if accepted is None or k in accepted:
                base_kw.setdefault(k, v)
        self._base = cls(pretrained=pretrained, **base_kw)
        self.is_simple = self._base.is_simple  # a simple-only base makes a simple run, as --model <base> would
        _fix_processor(self._base, pretrained)
        model = hf_model(self._base)
        if self.prune_config is not None:
            try:  # model-dependent checks (e.g. a stage layer past the last decoder layer) happen here
                vtprune.prune(model, self.prune_config)
            except ValueError as e:
                raise _bad(f"{pretrained}: {e}") from None
        self._model = model
        self.pretrained = pretrained
        self.model_type = model_type
        self.stats = PruneStats()
        self.last_summary: dict[str, float] | None = None
        self._rank, self._world_size, _ = process_ranks(self._accelerator())
        self._handles = [model.register_forward_pre_hook(self._forward_starts, with_kwargs=True),
                         model.register_forward_hook(self._forward_ends, always_call=True)]
        self._had_generate = "generate" in vars(model)
        self._saved_generate = model.generate
        model.generate = self._timed_generate  # instance attribute: removed again in clean()
        eval_logger.info(f"vtprune: {pretrained} ({model_type}) base={self.base_name} "
                         f"config={json.dumps(self.config_dict)} rank {self._rank}/{self._world_size} on {self.device}")

    @staticmethod
    def _device_defaults(given: dict[str, Any]) -> dict[str, Any]:
        device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        out = {"device": device}
        if str(device) == "cpu":
            out["device_map"] = "cpu"  # lmms-eval's HF classes default device_map to CUDA (or "", which fails)
        return out

    def _accelerator(self) -> Any:
        acc = getattr(self._base, "accelerator", None)
        if acc is None:
            from accelerate import Accelerator

            acc = Accelerator()
        return acc

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VTPrune:
        """As lmms-eval's, but ``--model_args`` win over the CLI's ``--batch_size`` / ``--device`` (lmms-eval's
        default would pass both and fail with a duplicate keyword)."""
        return cls(**lmms_hf.model_args(arg_string, additional_config))

    # ---- delegation --------------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the wrapper lacks (accelerator, processor, chat_template, ...): the base's
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_base"], name)

    @property
    def task_dict(self) -> dict:
        return self._base.task_dict if "_base" in self.__dict__ else self.__dict__.get("_task_dict", {})

    @task_dict.setter
    def task_dict(self, value: dict) -> None:
        if "_base" in self.__dict__:
            self._base.task_dict = value
        else:
            self.__dict__["_task_dict"] = value

    @property
    def base(self) -> lmms:
        """The wrapped lmms-eval model object."""
        return self._base

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._base.tokenizer

    @property
    def batch_size(self) -> Any:
        return self._base.batch_size

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def config_dict(self) -> dict[str, Any]:
        """The full pruning config of this run (``{"method": "none"}`` unpruned)."""
        return self.prune_config.to_dict() if self.prune_config is not None else {"method": "none"}

    def run_info(self) -> dict[str, Any]:
        """What a results reader needs to know about this run besides the metric."""
        return {"config": self.config_dict, "base": self.base_name, "model": self.pretrained,
                "device": str(self.device), "world_size": self.world_size}

    def _wrap(self, results: list[Any]) -> list[Any]:
        info = self.run_info()
        out = []
        for r in results:
            if isinstance(r, GenerationResult):
                tc = r.token_counts.to_dict() if r.token_counts is not None else {}
                out.append(GenerationResult(text=r.text, token_counts=VTPruneTokenCounts(**tc, vtprune=info)))
            elif isinstance(r, str):
                out.append(GenerationResult(text=r, token_counts=VTPruneTokenCounts(vtprune=info)))
            else:
                out.append(r)
        return out

    def generate_until(self, requests: list[Instance]) -> list[Any]:
        return self._wrap(self._base.generate_until(requests))

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self._base.loglikelihood(requests)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[Any]:
        return self._wrap(self._base.generate_until_multi_round(requests))

    # ---- statistics: the model's generate and forward, timed and counted -------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _report(self) -> Any:
        return vtprune.last_report(self._model) if self.prune_config is not None else None

    def _timed_generate(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
        self._sync()
        call = _Call(time.perf_counter(), "generate", ids, kwargs.get("attention_mask"), self._report())
        token = _CALL.set(call)
        try:
            out = self._saved_generate(*args, **kwargs)
        finally:
            _CALL.reset(token)
        self._sync()
        self._record(call, call.prefill_ms or (time.perf_counter() - call.t0) * 1e3)
        return out

    def _forward_starts(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if _CALL.get() is not None:
            return  # a step of a generate call, or a nested forward
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._sync()
        call = _Call(time.perf_counter(), "forward", ids, kwargs.get("attention_mask"), self._report())
        call.token = _CALL.set(call)

    def _forward_ends(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        call = _CALL.get()
        if call is None:
            return
        if call.prefill_ms is None:  # the first forward of a call is its prefill: its end is the first token
            self._sync()
            call.prefill_ms = (time.perf_counter() - call.t0) * 1e3
        if call.kind == "forward" and call.token is not None:
            _CALL.reset(call.token)
            self._record(call, call.prefill_ms)

    def _record(self, call: _Call, prefill_ms: float) -> None:
        """Add one call's per-sample statistics: from vtprune's report when the call was pruned, else counted in the
        unpruned prompt (method=none, a call without images, a budget above the image's tokens)."""
        ids = call.ids
        if not torch.is_tensor(ids) or ids.dim() != 2:
            return
        mask = torch.ones_like(ids, dtype=torch.bool) if call.mask is None else call.mask.bool()
        rep = self._report()
        s = PruneStats()
        if rep is not None and rep is not call.before:
            layer_avg = list(getattr(rep, "avg_visual_per_layer", None) or [])
            # with several stages an image has one entry per stage: it enters with the most tokens and leaves the
            # language model with the fewest
            per_image: dict[tuple[int, int], tuple[int, int]] = {}
            for i in rep.images:
                b0, a0 = per_image.get((i.sample, i.image), (0, i.n_after))
                per_image[(i.sample, i.image)] = (max(b0, i.n_before), min(a0, i.n_after))
            for b in range(ids.shape[0]):
                imgs = [v for (smp, _), v in per_image.items() if smp == b]
                after = sum(a for _, a in imgs)
                s.samples += 1
                s.images += len(imgs)
                s.visual_before += sum(bf for bf, _ in imgs)
                s.visual_after += after
                s.visual_per_layer += float(layer_avg[b]) if b < len(layer_avg) else float(after)
                s.llm_tokens += int(rep.tokens_after[b]) if b < len(rep.tokens_after) else 0
        else:
            cfg = self._model.config
            tok_id = getattr(cfg, "image_token_id", None)
            if tok_id is None:
                tok_id = getattr(cfg, "image_token_index", -1)
            is_img = (ids == tok_id) & mask.to(ids.device)
            # one image = one run of placeholder tokens (each family lays an image out as one contiguous run)
            starts = is_img & ~torch.nn.functional.pad(is_img[:, :-1], (1, 0), value=False)
            s.samples = ids.shape[0]
            s.images = int(starts.sum())
            n_vis = float(is_img.sum())
            s.visual_before = s.visual_after = s.visual_per_layer = n_vis
            s.llm_tokens = float(mask.sum())
        if s.images == 0:
            return  # text-only calls say nothing about pruning
        s.calls = 1
        s.prefill_ms = prefill_ms
        self.stats.add(s)

    # ---- end of run --------------------------------------------------------------------------------------------------
    def gathered_stats(self) -> PruneStats:
        """This run's statistics summed over all ranks (a collective: every rank must call it)."""
        total = PruneStats(**asdict(self.stats))
        dist = torch.distributed
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * self.world_size
            dist.all_gather_object(parts, asdict(self.stats))
            total = PruneStats()
            for p in parts:
                total.add(PruneStats(**p))
        return total

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._had_generate:
            self._model.generate = self._saved_generate
        else:
            vars(self._model).pop("generate", None)

    def clean(self) -> None:
        """Called by lmms-eval on every rank once all requests are answered: merge the ranks' statistics, log them
        into the results (rank 0), restore the model's generate, then let the base free the model."""
        total = self.gathered_stats()
        self.last_summary = {**total.summary(), "vtprune_world_size": float(self.world_size),
                             "vtprune_cuda": float(self.device.type == "cuda")}
        if self.rank == 0 and total.calls:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            # zero time and tokens: the base logs its own; these keys only add vtprune's
            log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0,
                        additional_metrics=self.last_summary)
            eval_logger.info("vtprune run: " + json.dumps({**self.run_info(), "stats": self.last_summary}))
        self.stats = PruneStats()
        self._restore()
        if hasattr(self._base, "clean"):
            self._base.clean()


class VTPruneChat(VTPrune):
    """The chat-class entry of ``--model vtprune`` (lmms-eval's default; ``--force_simple`` picks :class:`VTPrune`)."""

    is_simple = False
