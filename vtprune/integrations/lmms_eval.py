"""lmms-eval 0.7.x model ``vtprune``: any supported Hugging Face VLM, pruned by one ``vtprune.prune`` call.

    lmms-eval --model vtprune \\
        --model_args pretrained=<dir or hub id>,method=divprune,keep=64 \\
        --tasks <tasks> --batch_size 4 --output_path out/ --log_samples
    accelerate launch --num_processes 2 -m lmms_eval --model vtprune ...      # data parallel, same metric

On a CPU-only machine add ``--multi_gpu`` (without it accelerate silently starts one process; with it, torchrun-style
processes and a gloo group) and set ``OMP_NUM_THREADS``; ``examples/lmms_eval_run.sh`` has both commands.

Registration: lmms-eval 0.7.x resolves ``--model`` names through its ``ModelRegistryV2``, which reads the
``lmms_eval.models`` entry-point group; vtprune's ``pyproject.toml`` points it at :func:`lmms_manifests`. (The old
``@register_model`` decorator fills a dict the 0.7 CLI never consults.)

``--model_args`` (comma separated; a value may be JSON):

* ``pretrained``: a local directory or hub id, loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor``.
* ``method``: a vtprune method (``vtprune.list_methods()``) or ``none`` (the same model, unpruned, through the same
  code path: the baseline of a sweep; ``keep``/``keep_ratio``/``positions``/``seed`` are then accepted and ignored,
  so one sweep template serves every method). Required.
* ``keep`` / ``keep_ratio`` / ``positions`` / ``seed`` and selector options: as in ``vtprune.prune``.
* ``stages``: a whole stage list as JSON (``stages=[{"method":"divprune","keep":64}]``) instead of ``method``/``keep``.
* ``batch_size`` (wins over ``--batch_size``), ``device`` (default ``cuda`` if available, else ``cpu``; one device
  per process under ``accelerate launch``), ``device_map``, ``dtype`` (``auto``, ``float32``, ``bfloat16``, ...),
  ``attn_implementation``, ``max_new_tokens`` (default when a task gives none), ``use_chat_template`` (default true:
  the processor's chat template when it has one), ``processor_class`` (``module:Class`` when ``AutoProcessor`` cannot
  rebuild the processor), ``trust_remote_code``. (``max_batch_size``, which lmms-eval's CLI passes, is accepted and
  unused.)

Where the pruning statistics land (lmms-eval 0.7.3 has no field for model metadata in the results JSON, so vtprune
uses the two channels it does have for models):

* results JSON, ``"throughput"``: lmms-eval's ``log_metrics`` record, written once per run by rank 0 with the
  statistics of **all** ranks (gathered in :meth:`VTPruneLMM.clean`, which every rank calls once after its
  requests). lmms-eval prefixes each key with ``avg_``: ``avg_vtprune_visual_tokens_before`` /
  ``avg_vtprune_visual_tokens_after`` (visual tokens per image entering the LLM, unpruned / pruned),
  ``avg_vtprune_visual_tokens_per_layer`` (per image, averaged over the LLM's decoder layers; equals ``after`` for
  ``pre_llm`` pruning), ``avg_vtprune_llm_input_tokens`` (per sample), ``avg_vtprune_prefill_ms`` (mean per model
  call: vision encoding + selection + LLM prefill, i.e. time to first token), ``avg_vtprune_images``,
  ``avg_vtprune_samples``, ``avg_vtprune_calls``. ``"config"."model_args"`` holds the arguments verbatim.
* samples JSONL (``--log_samples``), each generated sample's ``"token_counts"``: ``input_tokens`` (the tokens the
  LLM actually attended, after pruning; lmms-eval sums them into the results JSON's ``"efficiency"``),
  ``output_tokens``, and ``"vtprune"``: this sample's statistics plus the full ``PruneConfig.to_dict()``.
* the log: rank 0 logs one ``vtprune run: {"config": ..., "stats": ...}`` line with the full config.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

import vtprune
from vtprune.config import PruneConfig

MODEL_ID = "vtprune"
CLASS_PATH = f"{__name__}.VTPruneLMM"

_GEN_PASSTHROUGH = ("top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty", "min_new_tokens")
_MODEL_ARGS = ("pretrained", "method", "keep", "keep_ratio", "positions", "seed", "stages", "batch_size", "device",
               "device_map", "dtype", "attn_implementation", "max_new_tokens", "use_chat_template", "processor_class",
               "trust_remote_code")


def lmms_manifests() -> list[Any]:
    """Entry-point payload for lmms-eval's ``lmms_eval.models`` group: ``--model vtprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


@dataclass
class PruneStats:
    """Running sums of one run's pruning statistics (summed, so ranks merge by addition)."""

    calls: int = 0  # model calls with at least one counted sample (generate batches, log-likelihood batches)
    samples: int = 0
    images: int = 0
    visual_before: float = 0.0  # visual tokens of the counted images as the unpruned model lays them out
    visual_after: float = 0.0  # ... entering the LLM after pruning
    visual_per_layer: float = 0.0  # per sample: visual tokens averaged over the LLM's decoder layers
    llm_tokens: float = 0.0  # tokens the LLM attends in prefill (text + kept visual, no padding)
    prefill_ms: float = 0.0
    gen_seconds: float = 0.0
    gen_tokens: int = 0

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
    """lmms-eval's per-sample token counts plus this sample's vtprune statistics and config (``"vtprune"`` key of
    ``token_counts`` in the samples JSONL)."""

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
            raise _bad(f"unknown model_args {sorted(options)} for method=none; valid: {', '.join(_MODEL_ARGS)}")
        return None
    d = {"method": method, "keep": keep, "keep_ratio": keep_ratio, **options}
    d = {k: v for k, v in d.items() if v is not None}
    try:
        return PruneConfig.from_dict({**d, "positions": positions, "seed": seed}).validate()
    except ValueError as e:
        raise _bad(str(e)) from None


def _import_path(path: str) -> Any:
    """``"package.module:attr"`` or ``"package.module.attr"`` -> the attribute."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_processor(pretrained: str, processor_class: str | None = None, **kw: Any) -> Any:
    """The checkpoint's multimodal processor.

    ``AutoProcessor`` first; when it hands back only a tokenizer (a processor class it does not know, e.g. the
    image-only subclasses of ``vtprune.processors``), the class named in ``processor_config.json`` is looked up in
    vtprune's image-only classes and in transformers. ``processor_class="module:Class"`` overrides both.
    """
    from transformers import AutoProcessor, ProcessorMixin

    from vtprune.processors import processor_class as image_only_class

    if processor_class:
        cls = image_only_class(processor_class) or _import_path(processor_class)
        return cls.from_pretrained(pretrained, **kw)
    proc = AutoProcessor.from_pretrained(pretrained, **kw)
    if isinstance(proc, ProcessorMixin):
        return proc
    name = None
    cfg = os.path.join(pretrained, "processor_config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            name = json.load(f).get("processor_class")
    cls = image_only_class(name) if name else None  # vtprune.processors: transformers' processors, no video part
    if cls is not None:
        return cls.from_pretrained(pretrained, **kw)
    import transformers

    if name and hasattr(transformers, name):
        return getattr(transformers, name).from_pretrained(pretrained, **kw)
    raise _bad(f"AutoProcessor.from_pretrained({pretrained!r}) returned only a {type(proc).__name__} (processor class "
               f"{name!r} is unknown); pass processor_class=<module:Class> in model_args")


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.lower() in ("true", "1", "yes"):
            return True
        if v.lower() in ("false", "0", "no"):
            return False
        raise _bad(f"expected true/false, got {v!r}")
    return bool(v)


def _as_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _bad(f"{name} must be an int ≥ {minimum}, got {v!r}")
    try:
        out = int(v)
    except ValueError:
        raise _bad(f"{name} must be an int ≥ {minimum}, got {v!r}") from None
    if out < minimum:
        raise _bad(f"{name} must be an int ≥ {minimum}, got {v!r}")
    return out


class VTPruneLMM(lmms):
    """lmms-eval simple model: a Hugging Face VLM pruned with vtprune (or run unpruned with ``method=none``)."""

    is_simple = True

    def __init__(self, pretrained: str, method: str | None = None, keep: Any = None, keep_ratio: Any = None,
                 positions: str = "preserve", seed: Any = 0, stages: Any = None, batch_size: Any = 1,
                 device: str | None = None, device_map: str | None = None, dtype: str = "auto",
                 attn_implementation: str | None = None, max_new_tokens: Any = 256, use_chat_template: Any = True,
                 processor_class: str | None = None, trust_remote_code: Any = False, max_batch_size: Any = None,
                 **options: Any) -> None:
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoConfig, AutoModelForImageTextToText

        # everything that can be wrong with the arguments fails here, before any weights load
        self.prune_config = build_prune_config(method, keep, keep_ratio, positions, seed, stages, **options)
        self.batch_size_per_gpu = _as_int("batch_size", batch_size)
        self.max_new_tokens = _as_int("max_new_tokens", max_new_tokens)
        self.use_chat_template = _as_bool(use_chat_template)
        remote = _as_bool(trust_remote_code)
        hf_config = AutoConfig.from_pretrained(pretrained, trust_remote_code=remote)
        self.model_type: str = hf_config.model_type
        if self.prune_config is not None:
            from vtprune.registry import get_adapter_class

            try:
                get_adapter_class(self.model_type)  # the library's own "unsupported model family" error, early
            except ValueError as e:
                raise _bad(f"{pretrained}: {e}") from None

        self.accelerator = Accelerator()
        self._rank, self._world_size, local_rank = self._ranks()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self._world_size > 1 and str(device).startswith("cuda") and device_map is None:
            device = f"cuda:{local_rank}"  # data parallel: one replica per process
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, str(dtype), None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise _bad(f"dtype must be auto or a torch dtype name (float32, bfloat16, float16), got {dtype!r}")
        load_kw: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": remote}
        if attn_implementation:
            load_kw["attn_implementation"] = attn_implementation
        if device_map:
            load_kw["device_map"] = device_map
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kw).eval()
        if not device_map:
            model.to(device)
        self._device = model.device if device_map else torch.device(device)
        self.processor = load_processor(pretrained, processor_class, trust_remote_code=remote)
        self._tokenizer = self.processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation appends after the prompt
        if self.prune_config is not None:
            try:  # model-dependent checks (e.g. a stage layer past the last decoder layer) happen here
                vtprune.prune(model, self.prune_config)
            except ValueError as e:
                raise _bad(f"{pretrained}: {e}") from None
        self._model = model
        self.pretrained = pretrained
        self.stats = PruneStats()
        self.last_summary: dict[str, float] | None = None
        self._t0: float | None = None
        self._prefill_ms: float | None = None
        model.register_forward_hook(self._first_forward_done)
        eval_logger.info(f"vtprune: {pretrained} ({self.model_type}) config={json.dumps(self.config_dict)} "
                         f"rank {self._rank}/{self._world_size} on {self._device}")

    def _ranks(self) -> tuple[int, int, int]:
        """(rank, world size, local rank). On CPU, ``accelerate launch --multi_gpu`` starts the processes the way
        torchrun does and a gloo process group exists, yet ``Accelerator`` reports a single process; the process
        group (what lmms-eval's evaluator uses to shard and gather) is the authority when there is one."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return rank, world, int(os.environ.get("LOCAL_RANK", self.accelerator.local_process_index))

    # ---- lmms-eval plumbing ------------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VTPruneLMM:
        """As lmms-eval's, but ``--model_args`` win over the CLI's ``--batch_size`` / ``--device`` (lmms-eval's
        default would pass both and fail with a duplicate keyword)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args:
                args[k] = v
        return cls(**args)

    @property
    def config_dict(self) -> dict[str, Any]:
        """The full pruning config of this run (``{"method": "none"}`` unpruned)."""
        return self.prune_config.to_dict() if self.prune_config is not None else {"method": "none"}

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ---- prompts and inputs --------------------------------------------------------------------------------------
    def prompt(self, context: str, n_images: int) -> str:
        """The model-facing prompt: the processor's chat template when it has one, else the family's plain layout
        with the processor's image placeholder. A context that already holds placeholders gets no extra ones."""
        family = vtprune.registry.get_adapter_class(self.model_type)  # its plain prompt layout and placeholder
        placeholder, template = family.placeholder, family.prompt
        proc_token = getattr(self.processor, "image_token", None) or placeholder
        if placeholder in context or proc_token in context:
            n_images = 0
        if self.use_chat_template and getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return template.format(img=" ".join([placeholder] * n_images), q=context)

    def _visuals(self, inst: Instance) -> list[Any]:
        args = inst.args
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        vis = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        vis = [v for v in (vis or []) if v is not None]
        for v in vis:
            if not hasattr(v, "convert"):
                raise _bad(f"only image inputs are supported (task {task!r} gave a {type(v).__name__}: video/audio "
                           "are not pruned by vtprune yet)")
        return [v.convert("RGB") for v in vis]

    def _inputs(self, texts: list[str], images: list[list[Any]]) -> Any:
        flat = [im for row in images for im in row]
        kw: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if flat:
            kw["images"] = flat
        inputs = self.processor(**kw)
        inputs = inputs.to(self.device)
        dt = self.model.dtype
        for k, v in inputs.items():
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(dt)
        return inputs

    # ---- timing and statistics -----------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _first_forward_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # the first forward of a timed call is the prefill; its end marks the time to first token
        if self._t0 is not None and self._prefill_ms is None:
            self._sync()
            self._prefill_ms = (time.perf_counter() - self._t0) * 1e3

    def _start(self) -> Any:
        self._sync()
        self._prefill_ms = None
        self._t0 = time.perf_counter()
        return vtprune.last_report(self.model) if self.prune_config is not None else None

    def _per_sample(self, inputs: Any, n_images: list[int], before_report: Any) -> list[dict[str, Any]]:
        """This call's statistics per sample: from the vtprune report when this call was pruned, else counted from
        the unpruned prompt (method=none, or a call without images)."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        rep = vtprune.last_report(self.model) if self.prune_config is not None else None
        out = []
        if rep is not None and rep is not before_report:  # a fresh report: this call was pruned
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
                out.append({"images": len(imgs), "visual_tokens_before": sum(bf for bf, _ in imgs),
                            "visual_tokens_after": after,
                            "visual_tokens_per_layer": float(layer_avg[b]) if b < len(layer_avg) else float(after),
                            "llm_input_tokens": int(rep.tokens_after[b]) if b < len(rep.tokens_after) else None})
            return out
        tok_id = getattr(self.model.config, "image_token_id", None)
        if tok_id is None:
            tok_id = getattr(self.model.config, "image_token_index", -1)
        counts = ((ids == tok_id) & mask).sum(1).tolist()
        for b in range(ids.shape[0]):
            out.append({"images": n_images[b], "visual_tokens_before": counts[b], "visual_tokens_after": counts[b],
                        "visual_tokens_per_layer": float(counts[b]), "llm_input_tokens": int(mask[b].sum())})
        return out

    def _record(self, rows: list[dict[str, Any]], counted: list[bool], prefill_ms: float, gen_s: float = 0.0,
                gen_tokens: int = 0) -> None:
        if not any(counted):
            return  # only padding requests (added by lmms-eval to even out ranks)
        s = self.stats
        s.calls += 1
        s.prefill_ms += prefill_ms
        s.gen_seconds += gen_s
        s.gen_tokens += gen_tokens
        for r, c in zip(rows, counted):
            if c:
                s.samples += 1
                s.images += r["images"]
                s.visual_before += r["visual_tokens_before"]
                s.visual_after += r["visual_tokens_after"]
                s.visual_per_layer += r["visual_tokens_per_layer"]
                s.llm_tokens += r["llm_input_tokens"] or 0

    @staticmethod
    def _counted(inst: Instance) -> bool:
        return not (inst.metadata or {}).get("__padding_only__", False)

    # ---- batching --------------------------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], key: Callable[[Instance], str]) -> Iterable[list[int]]:
        """Indices in batches of ``batch_size`` with equal ``key``; longest contexts first (padding and memory peaks
        are met early, as lmms-eval's own models do)."""
        order = sorted(range(len(requests)), key=lambda i: (key(requests[i]), -len(requests[i].args[0]), i))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or key(requests[batch[0]]) != key(requests[i])):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    # ---- requests ----------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Batched generation (left padding); honours ``until``, ``max_new_tokens`` and ``temperature`` (0 = greedy)."""
        from tqdm import tqdm

        def gen_key(inst: Instance) -> str:
            return json.dumps(inst.args[1], sort_keys=True, default=str)

        results: list[GenerationResult | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune generate")
        for idx in self._batches(requests, gen_key):
            insts = [requests[i] for i in idx]
            gen_kwargs = dict(insts[0].args[1] or {})
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            images = [self._visuals(r) for r in insts]
            texts = [self.prompt(r.args[0], len(im)) for r, im in zip(insts, images)]
            inputs = self._inputs(texts, images)
            kw = self._generation_kwargs(gen_kwargs)
            before = self._start()
            with torch.no_grad():
                out = self.model.generate(**inputs, **kw)
            self._sync()
            gen_s = time.perf_counter() - self._t0
            prefill_ms, self._t0 = self._prefill_ms or gen_s * 1e3, None
            rows = self._per_sample(inputs, [len(im) for im in images], before)
            new = out[:, inputs["input_ids"].shape[1]:]
            n_new = self._generated_lengths(new)
            self._record(rows, [self._counted(r) for r in insts], prefill_ms, gen_s, sum(n_new))
            for j, (i, r) in enumerate(zip(idx, insts)):
                text = self.tokenizer.decode(new[j], skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                stats = {**rows[j], "prefill_ms": prefill_ms, "batch_size": len(insts), "config": self.config_dict}
                results[i] = GenerationResult(text=text, token_counts=VTPruneTokenCounts(
                    input_tokens=rows[j]["llm_input_tokens"], output_tokens=n_new[j], vtprune=stats))
                self.cache_hook.add_partial("generate_until", (r.args[0], r.args[1]), text)
            pbar.update(len(insts))
        pbar.close()
        return results  # type: ignore[return-value]

    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        temperature = gen_kwargs.get("temperature")
        sample = bool(gen_kwargs.get("do_sample", False)) if temperature is None else float(temperature) > 0
        kw: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                              "do_sample": sample}
        if sample and temperature is not None:
            kw["temperature"] = float(temperature)
        for k in _GEN_PASSTHROUGH:
            if gen_kwargs.get(k) is not None and (sample or k not in ("top_p", "top_k")):
                kw[k] = gen_kwargs[k]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is not None:
            kw["pad_token_id"] = pad
        return kw

    def _generated_lengths(self, new: torch.Tensor) -> list[int]:
        """New tokens per row up to and including the first end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [], device=new.device)
        out = []
        for row in new:
            hit = torch.isin(row, eos_ids).nonzero()
            out.append(int(hit[0]) + 1 if hit.numel() else int(row.numel()))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request ``(loss, is_greedy)``: the continuation's mean negative log-likelihood per token given
        context + images, and whether greedy decoding would produce it.

        The sign and scale are lmms-eval 0.7's convention, not its docstring's: its HF models return the language
        modelling loss, and its multiple-choice scorer takes the ``argmin`` (a summed log-probability would make it
        pick the least likely choice). The sum is ``-loss * n_tokens``. The pruned forward returns logits over the
        pruned sequence; the continuation is that sequence's unchanged text tail, which the report's ``token_map``
        confirms.
        """
        from tqdm import tqdm

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune loglikelihood")
        for idx in self._batches(requests, lambda r: ""):
            insts = [requests[i] for i in idx]
            if any(len(r.args) < 6 for r in insts):
                raise _bad("log-likelihood requests without a visual (e.g. acc_mutual_info's unconditional "
                           "requests) are not supported")
            images = [self._visuals(r) for r in insts]
            prompts, fulls, n_cont = [], [], []
            for r, im in zip(insts, images):
                ctx, target, _, doc_id, task, split = r.args[:6]
                cont = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                p = self.prompt(ctx, len(im))
                prompts.append(p)
                fulls.append(p + str(cont))
            for p, f in zip(prompts, fulls):
                n = len(self.tokenizer(f)["input_ids"]) - len(self.tokenizer(p)["input_ids"])
                if n < 1:
                    raise _bad(f"continuation of {f!r} tokenises to no tokens after its context")
                n_cont.append(n)
            inputs = self._inputs(fulls, images)
            keep = max(n_cont) + 1
            before = self._start()
            with torch.no_grad():
                logits = self.model(**inputs, logits_to_keep=keep).logits[:, -keep:].float()
            self._sync()
            prefill_ms, self._t0 = (time.perf_counter() - self._t0) * 1e3, None
            rows = self._per_sample(inputs, [len(im) for im in images], before)
            self._check_tail(inputs, keep, before)
            self._record(rows, [self._counted(r) for r in insts], prefill_ms)
            ids = inputs["input_ids"]
            logp = torch.log_softmax(logits, dim=-1)
            for j, (i, n) in enumerate(zip(idx, n_cont)):
                target = ids[j, -n:]
                lp = logp[j, -n - 1:-1]
                nll = -lp.gather(-1, target[:, None]).mean()
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (float(nll), greedy)
            pbar.update(len(insts))
        pbar.close()
        return results  # type: ignore[return-value]

    def _check_tail(self, inputs: Any, keep: int, before_report: Any) -> None:
        """The last ``keep`` positions of the pruned sequence must be the last ``keep`` of the caller's sequence."""
        if self.prune_config is None:
            return
        rep = vtprune.last_report(self.model)
        if rep is None or rep is before_report or rep.token_map is None:
            return
        length = inputs["input_ids"].shape[1]
        want = torch.arange(length - keep, length, device=rep.token_map.device)
        if not (rep.token_map[:, -keep:] == want).all():
            raise RuntimeError("vtprune: the pruned sequence's tail is not the prompt's text tail; log-likelihoods "
                               "would be misaligned (token_map " f"{rep.token_map[:, -keep:].tolist()})")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vtprune lmms-eval model does not implement multi-round generation")

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

    def clean(self) -> None:
        """Called by lmms-eval on every rank once all requests are answered: merge the ranks' statistics, log them
        into the results (rank 0), then free the model as lmms-eval's own models do."""
        total = self.gathered_stats()
        self.last_summary = total.summary()
        if self.rank == 0 and total.calls:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            speed = total.gen_tokens / total.gen_seconds if total.gen_seconds else 0.0
            log_metrics(total_elapsed_time=total.gen_seconds, total_gen_tokens=total.gen_tokens, avg_speed=speed,
                        additional_metrics=self.last_summary)
            eval_logger.info("vtprune run: " + json.dumps({"config": self.config_dict, "model": self.pretrained,
                                                           "stats": self.last_summary}))
        self.stats = PruneStats()
        super().clean()
