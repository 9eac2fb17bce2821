"""lmms-eval model ``vtprune_hf``: any transformers image-text-to-text model, batched, with log-likelihoods.

The base ``--model vtprune`` falls back to for families lmms-eval has no class for, and the one to pick for
multiple-choice tasks on families whose lmms-eval class has no ``loglikelihood`` (``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl``, ``internvl_hf``, ``huggingface``). It knows nothing about pruning: ``--model vtprune`` prunes its
model like any other base's. Usable on its own (``--model vtprune_hf``) as an unpruned baseline.

``--model_args``: ``pretrained`` (directory or hub id, or ``vtprune:<demo model>``), ``batch_size``, ``device``
(default ``cuda`` if available, else ``cpu``; one device per process under ``accelerate launch``), ``device_map``,
``dtype`` (``auto``, ``float32``, ``bfloat16``, ...), ``attn_implementation``, ``max_new_tokens`` (default when a
task gives none), ``use_chat_template`` (default true: the processor's chat template when it has one, else the
family's plain prompt layout), ``processor_class`` (``module:Class`` when ``AutoProcessor`` cannot rebuild the
processor), ``trust_remote_code``. (``max_batch_size``, which lmms-eval's CLI passes, is accepted and unused.)
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

import vtprune

MODEL_ID = "vtprune_hf"
CLASS_PATH = f"{__name__}.HFModel"

_GEN_PASSTHROUGH = ("top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty", "min_new_tokens")


def _bad(msg: str) -> ValueError:
    return ValueError(f"vtprune lmms-eval model: {msg}")


def model_args(arg_string: str, additional_config: dict | None = None) -> dict[str, Any]:
    """``--model_args`` parsed, with the CLI's non-None settings (``batch_size``, ``device``, ...) filling only the
    keys ``--model_args`` does not give."""
    from lmms_eval import utils

    args = utils.simple_parse_args_string(arg_string)
    for k, v in (additional_config or {}).items():
        if v is not None and k not in args:
            args[k] = v
    return args


def resolve_pretrained(pretrained: str) -> str:
    """``vtprune:<name>`` -> the directory of the shipped demo model ``name`` (``vtprune:llava``,
    ``vtprune:qwen2_vl``); anything else unchanged."""
    if isinstance(pretrained, str) and pretrained.startswith("vtprune:"):
        from vtprune.demo_models import model_dir

        return str(model_dir(pretrained.split(":", 1)[1]))
    return pretrained


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


def as_bool(v: Any) -> bool:
    """A model_args flag: true/false, 1/0, yes/no (case-insensitive) or a bool."""
    if isinstance(v, str):
        if v.lower() in ("true", "1", "yes"):
            return True
        if v.lower() in ("false", "0", "no"):
            return False
        raise _bad(f"expected true/false, got {v!r}")
    return bool(v)


def as_int(name: str, v: Any, minimum: int = 1) -> int:
    """A model_args integer ≥ ``minimum``; the error names the argument and the value."""
    if isinstance(v, bool) or not isinstance(v, (int, str, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _bad(f"{name} must be an int ≥ {minimum}, got {v!r}")
    try:
        out = int(v)
    except ValueError:
        raise _bad(f"{name} must be an int ≥ {minimum}, got {v!r}") from None
    if out < minimum:
        raise _bad(f"{name} must be an int ≥ {minimum}, got {v!r}")
    return out


def process_ranks(accelerator: Any) -> tuple[int, int, int]:
    """(rank, world size, local rank). On CPU, ``accelerate launch --multi_gpu`` starts the processes the way
    torchrun does and a gloo process group exists, yet ``Accelerator`` reports a single process; the process
    group (what lmms-eval's evaluator uses to shard and gather) is the authority when there is one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = accelerator.process_index, accelerator.num_processes
    return rank, world, int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))


class HFModel(lmms):
    """lmms-eval simple model over ``AutoModelForImageTextToText`` + the checkpoint's processor."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: Any = 1, device: str | None = None, device_map: str | None = None,
                 dtype: str = "auto", attn_implementation: str | None = None, max_new_tokens: Any = 256,
                 use_chat_template: Any = True, processor_class: str | None = None, trust_remote_code: Any = False,
                 max_batch_size: Any = None) -> None:
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoConfig, AutoModelForImageTextToText

        pretrained = resolve_pretrained(pretrained)
        self.batch_size_per_gpu = as_int("batch_size", batch_size)
        self.max_new_tokens = as_int("max_new_tokens", max_new_tokens)
        self.use_chat_template = as_bool(use_chat_template)
        remote = as_bool(trust_remote_code)
        self.model_type: str = AutoConfig.from_pretrained(pretrained, trust_remote_code=remote).model_type
        self.accelerator = Accelerator()
        self._rank, self._world_size, local_rank = process_ranks(self.accelerator)
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
        self._model = model
        self.pretrained = pretrained

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HFModel:
        """As lmms-eval's, but ``--model_args`` win over the CLI's ``--batch_size`` / ``--device`` (lmms-eval's
        default would pass both and fail with a duplicate keyword)."""
        return cls(**model_args(arg_string, additional_config))

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
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune_hf generate")
        for idx in self._batches(requests, gen_key):
            insts = [requests[i] for i in idx]
            gen_kwargs = dict(insts[0].args[1] or {})
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            images = [self._visuals(r) for r in insts]
            texts = [self.prompt(r.args[0], len(im)) for r, im in zip(insts, images)]
            inputs = self._inputs(texts, images)
            with torch.no_grad():
                out = self.model.generate(**inputs, **self._generation_kwargs(gen_kwargs))
            new = out[:, inputs["input_ids"].shape[1]:]
            n_new = self._generated_lengths(new)
            for j, (i, r) in enumerate(zip(idx, insts)):
                text = self.tokenizer.decode(new[j], skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results[i] = GenerationResult(text=text, token_counts=TokenCounts(output_tokens=n_new[j]))
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
        pick the least likely choice). On a model pruned by vtprune the forward returns logits over the pruned
        sequence; the continuation is that sequence's unchanged text tail, which the report's ``token_map`` confirms.
        """
        from tqdm import tqdm

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune_hf loglikelihood")
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
            before = vtprune.last_report(self.model) if vtprune.is_pruned(self.model) else None
            with torch.no_grad():
                logits = self.model(**inputs, logits_to_keep=keep).logits[:, -keep:].float()
            self._check_tail(inputs, keep, before)
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
        """On a pruned model, the last ``keep`` positions of the pruned sequence must be the last ``keep`` of the
        caller's sequence (else the log-likelihoods would score the wrong tokens)."""
        if not vtprune.is_pruned(self.model):
            return
        rep = vtprune.last_report(self.model)
        if rep is None or rep is before_report or rep.token_map is None:  # this call pruned nothing
            return
        length = inputs["input_ids"].shape[1]
        want = torch.arange(length - keep, length, device=rep.token_map.device)
        if not (rep.token_map[:, -keep:] == want).all():
            raise RuntimeError("vtprune: the pruned sequence's tail is not the prompt's text tail; log-likelihoods "
                               "would be misaligned (token_map " f"{rep.token_map[:, -keep:].tolist()})")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vtprune_hf does not implement multi-round generation")
