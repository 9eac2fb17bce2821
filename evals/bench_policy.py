"""Control-step latency of robot policies, unpruned vs pruned, measured side by side.

Two policies with random weights at their real layer widths, built from the configs written out below:

* **π0** (``PI0ForConditionalGeneration``): PaliGemma-3B prefix (SigLIP So400m 224/14, 256 tokens per camera;
  Gemma-2B) and the 300M action expert, chunk 50, 10 denoising steps, 3 cameras, a short instruction. One control
  step = ``policy.sample_actions(...)``. ``pre_llm`` methods (``divprune``, ``random``, ``fastervlm``) prune every
  camera's prefix tokens; ``fastv`` / ``vla_pruner`` (in-LLM, layer K) prune inside the VLM's prefix pass, and the
  action expert's layers >= K read only the kept prefix entries.
* **An autoregressive action-token policy** (OpenVLA-style) at LLaVA-1.5-7B widths (CLIP ViT-L/14-336, 576 tokens;
  Llama-7B): one control step = ``generate`` of 7 action tokens (ids restricted to the last 256 of the vocabulary, the
  action bins). ``vla_pruner`` runs inside ``vtprune.episode`` after its warm-up steps; ``fastv`` beside it.

The real depth (π0: 27 SigLIP / 18 Gemma / 18 expert layers; LLaVA: 24 CLIP / 32 Llama) takes minutes per step on a
CPU at fp32, so the stacks are cut to a few layers and the real depth is **extrapolated** per layer, labelled as such:
every layer's own ``forward`` is timed inside the measured steps, and

    T(real) = T(measured) + sum over stacks of (real depth - measured depth) x (time of one added layer),

an added layer costing what a plain layer of that stack cost in the same run (vision towers: the mean of all but the
last layer, which carries the ``fastervlm`` probe; decoder stacks: the last layer, which is never probed and, for
in-LLM methods, already pruned). In-LLM methods are measured with K = 1; at real depth K is the method's default
(fastv 2, vla_pruner 3), so K_real - 1 added layers cost an unpruned layer instead. vtprune's hooks and one-time
selection are outside the layers' ``forward`` and stay unscaled. The rule is checked: a second π0 at a deeper cut
is measured, predicted from the shallow one, and the error reported. Extrapolated values are computed per timed run
(run i of every variant from round i), so they have a median, a p10-p90 and flagged ratios like the measured ones.

Timing by ``vtprune._timing``: every variant of a policy runs once per round, interleaved, after a warm-up round
(pruning and unpruning happen around each pruned call, untimed), threads pinned, median and p10-p90, ratios of
medians from the same run flagged ('~' / '?') where the spread does not support them. Overhead: the selector's own
time (``last_report(policy).selector_ms``) as a share of the unpruned step; for π0's ``pre_llm`` methods at 25 % the
pruned pipeline against an oracle fed the kept prefix directly (as ``evals/bench_overhead.py`` does); for in-LLM
methods (no oracle) an estimate: the time they add outside the layers' forward (hooks, selection) plus what their
probed layer K-1 costs over the unpruned one. Every step also reports its prefix KV-cache bytes, read from the cache
tensors, and where its time goes (per-layer cost of each stack, time outside the layers).

    python evals/bench_policy.py [--repeats 5] [--threads 1] [--policies pi0,action_tokens] [--quick]
                                 [--out evals/results/policy_cpu.json]   # the plot goes beside it (.png)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtprune  # noqa: E402
from vtprune import _timing  # noqa: E402
from vtprune.testing import IMAGE_TOKEN, tiny_image, tiny_tokenizer  # noqa: E402

#: kept share of every camera's (image's) visual tokens
BUDGETS = (0.5, 0.25, 0.125)
GOAL_BUDGET, GOAL_SPEEDUP, GOAL_OVERHEAD = 0.25, 1.8, 0.03
PRE_LLM = ("divprune", "random", "fastervlm")
IN_LLM = ("fastv", "vla_pruner")
#: in-LLM methods are measured pruning from layer 1 of the cut stacks; at real depth from their default layer
K_MEASURED = 1
K_REAL = {"fastv": 2, "vla_pruner": 3}
#: vla_pruner: warm-up steps (unpruned, recording) before a step prunes; the paper's 3 only lengthens the untimed
#: warm-up, a pruned step reads the history in a weighted sum whose cost does not depend on it. record_layer 0 keeps
#: the action-attention probe out of the last layer, whose time the extrapolation scales
VLA_OPTIONS = {"window": 2, "record_layer": 0}
TASK = "pick up the red cube and put it in the bowl"

# ---- configs ------------------------------------------------------------------------------------------------------
#: π0 at real widths (transformers' PI0Config defaults = lerobot/pi0_base). The vocabulary is cut from 257152 to
#: 2048 (the tiny tokenizer's ids + π0's <loc>/<seg> tokens): an embedding lookup costs the same at any vocabulary
#: size and the VLM has no LM head in π0, so only memory (2 GB) changes.
PI0_REAL = dict(image=224, vision_hidden=1152, vision_ffn=4304, vision_heads=16, text_hidden=2048, text_ffn=16384,
                heads=8, kv_heads=1, head_dim=256, expert_hidden=1024, expert_ffn=4096, vocab=2048, chunk=50,
                steps=10, cameras=3, state_dim=32)
PI0_QUICK = dict(image=56, vision_hidden=64, vision_ffn=128, vision_heads=4, text_hidden=128, text_ffn=256,
                 heads=4, kv_heads=1, head_dim=32, expert_hidden=64, expert_ffn=128, vocab=2048, chunk=8, steps=3,
                 cameras=3, state_dim=8)
#: (vision layers, VLM/expert layers): measured, the deeper check, the real model
PI0_DEPTH = {"measured": (2, 2), "check": (4, 4), "real": (27, 18)}
PI0_DEPTH_QUICK = {"measured": (2, 2), "check": (3, 3), "real": (27, 18)}
#: LLaVA-1.5-7B widths (CLIP ViT-L/14-336 + Llama-2-7B, vocabulary 32064), the action-token policy of part 2
LLAVA_REAL = dict(image=336, vision_hidden=1024, vision_ffn=4096, vision_heads=16, text_hidden=4096,
                  text_ffn=11008, heads=32, kv_heads=32, vocab=32064, actions=7, bins=256)
LLAVA_QUICK = dict(image=112, vision_hidden=64, vision_ffn=128, vision_heads=4, text_hidden=128, text_ffn=256,
                   heads=4, kv_heads=2, vocab=512, actions=7, bins=256)
LLAVA_DEPTH = {"measured": (2, 2), "real": (24, 32)}


# ---- builders -----------------------------------------------------------------------------------------------------
def build_pi0(w: dict[str, int], vision_layers: int, text_layers: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(policy, inputs of one control step: 3 camera images, the task, a robot state, fixed start noise)."""
    from transformers import PI0Config, PI0ForConditionalGeneration, PI0Processor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = tiny_tokenizer("pi0", specials=("<image>",), named={"image_token": "<image>"})
    ip = SiglipImageProcessorPil(size={"height": w["image"], "width": w["image"]})
    ip.image_seq_length = (w["image"] // 14) ** 2  # PI0Processor reads the tokens per camera here
    proc = PI0Processor(image_processor=ip, tokenizer=tok, max_state_dim=w["state_dim"], chunk_size=w["chunk"])
    assert len(proc.tokenizer) <= w["vocab"]
    head = dict(num_attention_heads=w["heads"], num_key_value_heads=w["kv_heads"], head_dim=w["head_dim"])
    text = dict(model_type="gemma", vocab_size=w["vocab"], hidden_size=w["text_hidden"],
                intermediate_size=w["text_ffn"], num_hidden_layers=text_layers, max_position_embeddings=8192,
                pad_token_id=tok.pad_token_id, **head)
    vision = dict(model_type="siglip_vision_model", hidden_size=w["vision_hidden"], intermediate_size=w["vision_ffn"],
                  num_hidden_layers=vision_layers, num_attention_heads=w["vision_heads"], image_size=w["image"],
                  patch_size=14, vision_use_head=False)
    vlm = dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=w["text_hidden"],
               image_token_id=proc.image_token_id, vocab_size=w["vocab"], pad_token_id=tok.pad_token_id)
    # the expert is as deep as the VLM: its layer i attends to the VLM's cache layer i
    expert = dict(model_type="gemma", hidden_size=w["expert_hidden"], intermediate_size=w["expert_ffn"],
                  num_hidden_layers=text_layers, max_position_embeddings=8192, **head)
    cfg = PI0Config(vlm_config=vlm, dit_config=expert, chunk_size=w["chunk"], max_state_dim=w["state_dim"],
                    max_action_dim=w["state_dim"], num_inference_steps=w["steps"])
    torch.manual_seed(0)
    model = PI0ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    images = [[tiny_image(w["image"], w["image"], seed=c) for c in range(w["cameras"])]]
    inputs = dict(proc(images=images, text=[TASK], return_tensors="pt"))
    gen = torch.Generator().manual_seed(0)
    inputs["state"] = torch.randn(1, w["state_dim"], generator=gen)
    inputs["noise"] = torch.randn(1, w["chunk"], w["state_dim"], generator=gen)
    return model, inputs


def build_llava(w: dict[str, int], vision_layers: int, text_layers: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(policy, inputs of one control step: one camera frame and the instruction)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=w["vision_hidden"], intermediate_size=w["vision_ffn"],
                              num_hidden_layers=vision_layers, num_attention_heads=w["vision_heads"],
                              image_size=w["image"], patch_size=14, projection_dim=768)
    text = dict(model_type="llama", vocab_size=w["vocab"], hidden_size=w["text_hidden"],
                intermediate_size=w["text_ffn"], num_hidden_layers=text_layers, num_attention_heads=w["heads"],
                num_key_value_heads=w["kv_heads"], max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    s = w["image"]
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": s},
                                                                crop_size={"height": s, "width": s}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    inputs = dict(proc(images=[tiny_image(s, s)], text=[f"USER: <image>\nWhat action should the robot take to {TASK}? "
                                                        "ASSISTANT:"], return_tensors="pt"))
    return model, inputs


def share_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameter tensors: a ``vla_pruner`` policy stays pruned (its episode lives
    on that pruning) while the other variants prune and unprune the original between calls; no extra weight memory
    and the same memory traffic as the original."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


# ---- what one step did: layer times, prefix cache, report ----------------------------------------------------------
class LayerClock:
    """Wall time of each layer's own ``forward`` (hooks excluded: vtprune's per-call selection sits in hooks and must
    not be scaled with depth), summed over the calls of one control step, per (stack, layer index)."""

    def __init__(self) -> None:
        self.acc: dict[tuple[str, int], float] = {}

    def install(self, stacks: dict[str, torch.nn.ModuleList]) -> None:
        for name, layers in stacks.items():
            for i, layer in enumerate(layers):
                # an instance attribute shadows the class's forward for this module only (copies get their own)
                layer.forward = functools.partial(self._timed, (name, i), layer.forward)

    def _timed(self, key: tuple[str, int], forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            self.acc[key] = self.acc.get(key, 0.0) + (time.perf_counter() - t0) * 1e3

    def take(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for (name, _), ms in sorted(self.acc.items()):
            out.setdefault(name, []).append(ms)
        self.acc = {}
        return out


def cache_layer_bytes(cache: Any) -> list[int]:
    """Bytes of each layer's key and value tensors as they are now (a cropped view counts its visible part)."""
    out = []
    for layer in getattr(cache, "layers", ()):
        out.append(sum(t.nbytes for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                       if isinstance(t, torch.Tensor)))
    if not out or not any(out):
        raise RuntimeError(f"cannot read the KV tensors of a {type(cache).__name__}")
    return out


class PrefixCache:
    """Per-layer bytes of the prefix KV cache, read where the prefix is complete and nothing else is in it yet: at the
    start of the ``at``-th call of ``module`` that gets a non-empty cache, or of every such call (``at=None``: the
    last one counts). π0: each expert pass starts on the prefix cache, re-cropped after the previous pass, so the
    last pass sees whatever vtprune did to it; action-token policy: the first decode step."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.calls, self.bytes = at, 0, None

    def install(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            return
        self.calls += 1
        if self.at is None or self.calls == self.at:
            self.bytes = cache_layer_bytes(cache)

    def take(self) -> list[int]:
        b, self.bytes, self.calls = self.bytes, None, 0
        if b is None:
            raise RuntimeError("the step never passed its prefix cache on")
        return b


@dataclass
class Variant:
    """One timed configuration of a policy and what its calls recorded (warm-up call first)."""

    name: str
    method: str  # "none" for the unpruned policy, "oracle:<method>" for an oracle
    budget: float | None
    keep: int | None
    case: _timing.Case
    model: torch.nn.Module | None = None  # the pruned model whose report to read (None: unpruned / oracle)
    layers: list[dict[str, list[float]]] = field(default_factory=list)
    kv: list[list[int]] = field(default_factory=list)
    selector_ms: list[float] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)


@contextlib.contextmanager
def recording(v: Variant, clock: LayerClock, cache: PrefixCache) -> Iterator[None]:
    """Around every call of ``v`` (outside its timed region): clear the clocks before, keep what the call did after
    (read while the model is still pruned)."""
    clock.take()
    cache.calls, cache.bytes = 0, None
    yield
    v.layers.append(clock.take())
    v.kv.append(cache.take())
    rep = vtprune.last_report(v.model) if v.model is not None and vtprune.is_pruned(v.model) else None
    v.selector_ms.append(rep.selector_ms if rep is not None else 0.0)
    v.kept.append(rep.visual_after if rep is not None else -1)


def with_recording(v: Variant, clock: LayerClock, cache: PrefixCache,
                   outer: Callable[[], contextlib.AbstractContextManager[object]] | None = None) -> _timing.Case:
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        with outer() if outer is not None else contextlib.nullcontext(), recording(v, clock, cache):
            yield

    return _timing.Case(v.case.fn, ctx)


# ---- π0's oracle: the kept prefix fed directly ---------------------------------------------------------------------
@dataclass
class Plan:
    """The kept prefix of one pruned call, prepared in advance: gather index, its mask and (preserved) positions, and
    per row the dropped tokens by which the action tokens' positions must be shifted."""

    index: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    shift: torch.Tensor


def pi0_plan(inputs: dict[str, Any], report: Any) -> Plan:
    tm = report.token_map
    idx, pad = tm.clamp(min=0), tm < 0
    full = inputs["attention_mask"]
    mask = full.gather(1, idx).masked_fill(pad, 0)
    pos = (full.cumsum(-1) - 1).gather(1, idx)  # sample_actions' positions of the unpruned prefix
    return Plan(idx, mask, pos, full.sum(1) - mask.sum(1))


@torch.no_grad()
def pi0_oracle(model: torch.nn.Module, inputs: dict[str, Any], plan: Plan) -> torch.Tensor:
    """``sample_actions`` on the kept prefix prepared in advance (the cost a perfect integration would pay): the model's
    own tower and embeddings, a gather, the VLM on the kept tokens, the same denoising loop."""
    m = model.model
    embeds = m.embed_prefix(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
    kept = embeds.gather(1, plan.index[..., None].expand(-1, -1, embeds.shape[-1]))
    cache = m.vlm(inputs_embeds=kept, attention_mask=plan.mask, position_ids=plan.positions,
                  token_type_ids=torch.zeros_like(kept[..., 0]), use_cache=True).cache
    prefix = cache.get_seq_length()
    steps = model.config.num_inference_steps
    dt, x = -1.0 / steps, inputs["noise"]
    for s in range(steps):
        t = torch.full((x.shape[0],), 1.0 + s * dt, dtype=torch.float32)
        out = model(state=inputs["state"], noise=x, timestep=t, pixel_attention_mask=inputs["pixel_attention_mask"],
                    attention_mask=plan.mask, cache=cache)
        cache.crop(prefix - cache.get_seq_length())
        x = x + dt * out.logits
    return x


@contextlib.contextmanager
def shifted_actions(model: torch.nn.Module, plan: Plan) -> Iterator[None]:
    """The oracle's action tokens get the positions the unpruned prefix gives them (PI0Model counts them over the
    kept prefix it is handed)."""

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "position_ids": kwargs["position_ids"] + plan.shift[:, None]}

    h = model.model.dit.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


# ---- statistics and extrapolation ----------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def per_added_layer(layers: dict[str, list[float]], stack: str) -> float:
    """What one more layer of ``stack`` costs in this run: vision towers, the mean of all but the last layer (it
    carries the fastervlm probe); decoder stacks, the last layer (never probed; pruned for in-LLM methods)."""
    ts = layers[stack]
    return sum(ts[:-1]) / (len(ts) - 1) if stack in VISION_STACKS and len(ts) > 1 else ts[-1]


VISION_STACKS = {"siglip", "clip"}


def extrapolate(step_ms: float, layers: dict[str, list[float]], depths: dict[str, tuple[int, int]],
                full_layers: dict[str, list[float]] | None = None, k_extra: int = 0) -> float:
    """T at the target depths from one measured step: each stack's added layers cost what a plain layer of that stack
    cost in this run. ``k_extra`` (in-LLM methods): that many added decoder layers lie before the real K, so they cost
    what the unpruned run's layer cost (``full_layers``, same round) instead of a pruned one."""
    t = step_ms
    for stack, (measured, target) in depths.items():
        per = per_added_layer(layers, stack)
        t += (target - measured) * per
        if k_extra and stack not in VISION_STACKS:
            t += k_extra * (per_added_layer(full_layers, stack) - per)
    return t


def real_kv(kv: list[int], target: int, k_real: int | None) -> int:
    """Prefix cache bytes at ``target`` decoder layers: pre-LLM pruning and unpruned, every layer as measured; in-LLM,
    the first K_real layers as full as the unpruned ones (layer 0 here) and the rest as the last measured layer."""
    if k_real is None:
        return round(sum(kv) / len(kv) * target)
    return kv[0] * k_real + kv[-1] * (target - k_real)


# ---- one policy -----------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    name: str
    model: torch.nn.Module
    inputs: dict[str, Any]
    step: Callable[[torch.nn.Module], Any]
    stacks: Callable[[torch.nn.Module], dict[str, torch.nn.ModuleList]]
    cache_module: Callable[[torch.nn.Module], torch.nn.Module]
    cache_at: int | None
    tokens_per_image: int
    images: int
    depths: dict[str, tuple[int, int]]  # stack: (measured, real)
    methods: tuple[str, ...]
    #: stack: (calls of one layer per step, what a component time is per): SigLIP's layer sees every camera at once,
    #: the expert's runs once per denoising step
    units: dict[str, tuple[int, str]] = field(default_factory=dict)


def pi0_setup(w: dict[str, int], depth: dict[str, tuple[int, int]], which: str,
              methods: tuple[str, ...] = PRE_LLM + IN_LLM) -> Setup:
    vl, tl = depth[which]
    model, inputs = build_pi0(w, vl, tl)
    rv, rt = depth["real"]
    return Setup("pi0", model, inputs, lambda m: m.sample_actions(**inputs),
                 lambda m: {"siglip": _tower(m.model.vlm.vision_tower).encoder.layers,
                            "prefix": m.model.vlm.language_model.layers, "expert": m.model.dit.layers},
                 lambda m: m.model, None, (w["image"] // 14) ** 2, w["cameras"],
                 {"siglip": (vl, rv), "prefix": (tl, rt), "expert": (tl, rt)}, methods,
                 {"siglip": (w["cameras"], "_per_camera"), "prefix": (1, ""),
                  "expert": (w["steps"], "_per_denoising_step")})


def llava_setup(w: dict[str, int]) -> Setup:
    vl, tl = LLAVA_DEPTH["measured"]
    model, inputs = build_llava(w, vl, tl)
    bins = w["bins"]
    suppress = list(range(w["vocab"] - bins))  # the action bins are the last `bins` ids (OpenVLA's layout)

    def step(m: torch.nn.Module) -> Any:
        return m.generate(**inputs, max_new_tokens=w["actions"], do_sample=False, suppress_tokens=suppress)

    rv, rt = LLAVA_DEPTH["real"]
    return Setup("action_tokens", model, inputs, step,
                 lambda m: {"clip": _tower(m.model.vision_tower).encoder.layers,
                            "llm": m.model.language_model.layers},
                 lambda m: m, 1, (w["image"] // 14) ** 2, 1, {"clip": (vl, rv), "llm": (tl, rt)},
                 IN_LLM,
                 {"clip": (1, ""), "llm": (1, "_per_control_step")})


def _tower(t: torch.nn.Module) -> torch.nn.Module:
    return getattr(t, "vision_model", t)  # SigLIP/CLIP vision models wrap their transformer, or are it


def keep_of(budget: float, n: int) -> int:
    return max(1, round(budget * n))


def run_policy(s: Setup, repeats: int, oracle_budget: float | None, budgets: tuple[float, ...] = BUDGETS
               ) -> dict[str, Any]:
    """Time every (method, budget) of one policy against the unpruned step, interleaved; for π0's pre-LLM
    methods at ``oracle_budget`` also the oracle fed the same kept prefix."""
    clock, cache = LayerClock(), PrefixCache(s.cache_at)
    forward = functools.partial(s.step, s.model)
    variants: list[Variant] = [Variant("unpruned", "none", None, None, _timing.Case(forward))]
    copies: list[torch.nn.Module] = []
    for method in s.methods:
        for b in budgets:
            k = keep_of(b, s.tokens_per_image)
            name = f"{method}@{b:g}"
            if method == "vla_pruner":  # a pruned copy of its own: the episode must outlive the other variants' calls
                m = share_weights(s.model)
                vtprune.prune(m, method=method, keep=k, layer=K_MEASURED, **VLA_OPTIONS)
                copies.append(m)
                variants.append(Variant(name, method, b, k, _timing.Case(functools.partial(s.step, m)), m))
                continue
            opts = {"layer": K_MEASURED} if method in IN_LLM else {}
            ctx = functools.partial(_timing.pruned, s.model, method=method, keep=k, **opts)
            variants.append(Variant(name, method, b, k, _timing.Case(forward, ctx), s.model))
            if method in PRE_LLM and b == oracle_budget and s.name == "pi0":
                with torch.no_grad(), ctx():
                    pruned_actions = forward()
                    plan = pi0_plan(s.inputs, vtprune.last_report(s.model))
                with shifted_actions(s.model, plan):
                    got = pi0_oracle(s.model, s.inputs, plan)
                err = (got - pruned_actions).abs().max().item()
                scale = pruned_actions.abs().max().item()
                assert err <= 1e-3 * max(1.0, scale), f"{method}: oracle and pruned step disagree by {err:g}"
                variants.append(Variant(f"oracle:{name}", f"oracle:{method}", b, k, _timing.Case(
                    functools.partial(pi0_oracle, s.model, s.inputs, plan),
                    functools.partial(shifted_actions, s.model, plan))))
    for m in [s.model, *copies]:
        clock.install(s.stacks(m))
        cache.install(s.cache_module(m))
    cases = {}
    for v in variants:
        outer = v.case.context if v.case.context is not contextlib.nullcontext else None
        cases[v.name] = with_recording(v, clock, cache, outer)
    with contextlib.ExitStack() as episodes:
        for m in copies:  # every vla_pruner policy in an episode of its own for the whole run, warm-up first
            episodes.enter_context(vtprune.episode(m))
            for _ in range(VLA_OPTIONS["window"]):
                s.step(m)
        st = _timing.measure(cases, repeats=repeats, warmup=1)
    for v in variants:  # every recorded call of a pruned variant (warm-up round included) kept exactly its budget
        if v.model is not None:
            assert v.kept == [v.keep * s.images] * len(v.kept), (v.name, v.kept)
    return summarize(s, variants, st, budgets)


def summarize(s: Setup, variants: list[Variant], st: dict[str, _timing.Stats], budgets: tuple[float, ...]
              ) -> dict[str, Any]:
    """Per variant: measured and extrapolated statistics, speed-up, prefix cache, overhead."""
    base = variants[0]
    u = st[base.name]
    real = {stack: (m, r) for stack, (m, r) in s.depths.items()}
    timed = {v.name: v.layers[-len(st[v.name].times_ms):] for v in variants}
    base_layers = timed[base.name]
    t_real: dict[str, _timing.Stats] = {}
    for v in variants:
        k_extra = K_REAL[v.method] - K_MEASURED if v.method in IN_LLM else 0
        t_real[v.name] = _timing.Stats(tuple(
            extrapolate(t, lay, real, full, k_extra)
            for t, lay, full in zip(st[v.name].times_ms, timed[v.name], base_layers)))
    ur = t_real[base.name]
    dec = next(stack for stack in s.depths if stack not in VISION_STACKS)
    target = s.depths[dec][1]
    def layer_medians(lay: list[dict[str, list[float]]]) -> dict[str, list[float]]:
        return {stack: [_median([r[stack][i] for r in lay]) for i in range(len(lay[0][stack]))] for stack in s.depths}

    def outside_layers(v: Variant) -> float:
        return _median([t - sum(sum(x) for x in r.values()) for t, r in zip(st[v.name].times_ms, timed[v.name])])

    base_comp, base_outside = layer_medians(base_layers), outside_layers(base)
    points = []
    for v in variants:
        lay = timed[v.name]
        comp = layer_medians(lay)
        med = {stack: _median([per_added_layer(r, stack) for r in lay]) for stack in s.depths}
        outside = outside_layers(v)
        p = dict(method=v.method, budget=v.budget, keep_per_image=v.keep, status="measured",
                 visual_tokens_after=v.kept[-1] if v.kept[-1] >= 0 else s.tokens_per_image * s.images,
                 timing=st[v.name].to_dict(), layers_ms=comp, per_added_layer_ms=med,
                 components_ms={**{f"{stack}_per_layer{s.units[stack][1]}": med[stack] / s.units[stack][0]
                                   for stack in med}, "outside_the_layers": outside},
                 kv_cache_bytes=sum(v.kv[-1]), kv_cache_bytes_per_layer=v.kv[-1],
                 selector_ms=_median(v.selector_ms[1:]) if len(v.selector_ms) > 1 else v.selector_ms[-1],
                 extrapolated_real_depth=dict(
                     label=f"EXTRAPOLATED to {', '.join(f'{k} {r}' for k, (_, r) in real.items())} layers",
                     timing=t_real[v.name].to_dict(),
                     kv_cache_bytes=real_kv(v.kv[-1], target, K_REAL.get(v.method))))
        if "siglip" in comp:
            p["siglip_tower_ms_per_camera"] = sum(comp["siglip"]) / s.images
            p["extrapolated_real_depth"]["siglip_tower_ms_per_camera"] = (
                med["siglip"] * s.depths["siglip"][1] / s.images)
        if v is not base:
            sp, spr = _timing.ratio(u, st[v.name]), _timing.ratio(ur, t_real[v.name])
            p["speedup"] = sp.to_dict()
            p["extrapolated_real_depth"]["speedup"] = spr.to_dict()
            p["selector_share_of_unpruned_step"] = p["selector_ms"] / u.median
            p["extrapolated_real_depth"]["selector_share_of_unpruned_step"] = p["selector_ms"] / ur.median
        if v.method in IN_LLM:
            # no oracle for in-LLM stages: what they add is their hooks and selection (outside the layers' forward)
            # plus the probed layer K-1 (attention weights; vla_pruner also records its actions there)
            probed = sum(comp[k][K_MEASURED - 1] - base_comp[k][K_MEASURED - 1] for k in comp if k not in VISION_STACKS)
            est = outside - base_outside + probed
            p["overhead_estimate"] = dict(
                rule="(time outside the layers - unpruned's) + (probed layer K-1 - unpruned's), medians",
                outside_added_ms=outside - base_outside, probed_layer_added_ms=probed, ms=est,
                share_of_unpruned_step=est / u.median, share_of_unpruned_step_real_depth_extrapolated=est / ur.median)
        if v.method.startswith("oracle:"):
            p["status"] = "oracle"
        points.append(p)
    # the pruned pipeline vs its oracle (π0 pre-LLM at the goal budget)
    by = {(p["method"], p["budget"]): p for p in points}
    for v in variants:
        if v.method.startswith("oracle:"):
            meth = v.method.split(":", 1)[1]
            pruned = next(x for x in variants if x.method == meth and x.budget == v.budget)
            r = _timing.ratio(st[pruned.name], st[v.name])
            diff = _median([a - b for a, b in zip(st[pruned.name].times_ms, st[v.name].times_ms)])
            by[(meth, v.budget)]["vs_oracle"] = dict(
                **r.to_dict(), median_paired_difference_ms=diff, share_of_unpruned_step=diff / u.median,
                share_of_unpruned_step_real_depth_extrapolated=diff / ur.median)
    return {"points": points}


# ---- printing, goal, plot --------------------------------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f}M" if n >= 2**20 else f"{n / 2**10:.0f}K"


def print_table(title: str, res: dict[str, Any]) -> None:
    print(f"\n== {title}")
    print("columns: budget = kept share of each camera's visual tokens (keep = tokens per camera); step = one control "
          "step, median and p10-p90 of the interleaved runs; speedup = unpruned / this (flagged); KV = prefix KV "
          "cache from the cache tensors; sel = vtprune's selector time (report) and its share of the unpruned step; "
          "vs oracle = this / the same step fed the kept prefix directly. Right of '|': EXTRAPOLATED to real depth")
    head = (f"{'method':>16} {'budget':>6} {'keep':>5} {'step ms':>9} {'p10-p90':>15} {'speedup':>8} {'KV':>7} "
            f"{'sel ms':>7} {'sel %':>6} {'vs oracle':>10} | {'step ms':>9} {'p10-p90':>15} {'speedup':>8} "
            f"{'KV':>7}")
    print(head)
    for p in res["points"]:
        t, x = p["timing"], p["extrapolated_real_depth"]
        sp = f"{p['speedup']['ratio']:.2f}x{p['speedup']['flag']}" if "speedup" in p else "1.00x"
        spr = f"{x['speedup']['ratio']:.2f}x{x['speedup']['flag']}" if "speedup" in x else "1.00x"
        orc = p.get("vs_oracle")
        orc_s = f"{orc['ratio']:.3f}x{orc['flag']}" if orc else "-"
        share = (f"{100 * p['selector_share_of_unpruned_step']:.2f}" if p["status"] == "measured" and
                 "selector_share_of_unpruned_step" in p else "-")
        name = p["method"]
        budget = f"{p['budget']:g}" if p["budget"] is not None else "1"
        keep = p["keep_per_image"] if p["keep_per_image"] is not None else "all"
        xt = x["timing"]
        print(f"{name:>16} {budget:>6} {keep:>5} {t['median_ms']:>9.0f} "
              f"{t['p10_ms']:>7.0f}-{t['p90_ms']:<7.0f} {sp:>8} {_fmt_bytes(p['kv_cache_bytes']):>7} "
              f"{p['selector_ms']:>7.2f} {share:>6} {orc_s:>10} | {xt['median_ms']:>9.0f} "
              f"{xt['p10_ms']:>7.0f}-{xt['p90_ms']:<7.0f} {spr:>8} {_fmt_bytes(x['kv_cache_bytes']):>7}")
    print_components(res)


def print_components(res: dict[str, Any]) -> None:
    """Where a step's time goes: each stack's per-layer cost (what an added layer costs; medians over the timed runs)
    and the time outside the layers (embeddings, heads, vtprune's hooks and selection, Python)."""
    pts = [p for p in res["points"] if p["status"] in ("measured", "oracle")]
    keys = list(pts[0]["components_ms"])
    print("components, ms (median): " + " | ".join(keys))
    for p in pts:
        budget = f"@{p['budget']:g}" if p["budget"] is not None else ""
        print(f"{p['method'] + budget:>22} " + " ".join(f"{p['components_ms'][k]:>10.1f}" for k in keys))


def check_extrapolation(shallow: dict[str, Any], deep: dict[str, Any], depth: dict[str, tuple[int, int]]
                        ) -> dict[str, Any]:
    """Predict the deeper π0's measured step from the shallow one's per-layer times, with the same rule (medians:
    the shallow step plus the added layers at their median per-layer cost)."""
    def stacks(which: str) -> dict[str, int]:
        return {"siglip": depth[which][0], "prefix": depth[which][1], "expert": depth[which][1]}

    lo, hi = stacks("measured"), stacks("check")
    out: dict[str, Any] = {"measured_depths": lo, "check_depths": hi, "points": []}
    for q in deep["points"]:
        p = next(x for x in shallow["points"] if x["method"] == q["method"] and x["budget"] == q["budget"])
        pred = p["timing"]["median_ms"] + sum((hi[k] - lo[k]) * p["per_added_layer_ms"][k] for k in lo)
        meas = q["timing"]["median_ms"]
        out["points"].append(dict(method=q["method"], budget=q["budget"], predicted_ms=pred, measured_ms=meas,
                                  measured=q["timing"], error=pred / meas - 1))
    u = out["points"][0]
    for c in out["points"][1:]:
        c["predicted_speedup"] = u["predicted_ms"] / c["predicted_ms"]
        c["measured_speedup"] = u["measured_ms"] / c["measured_ms"]
    return out


def goal(res: dict[str, Any]) -> list[str]:
    """The issue's goal on π0 at 25 %: control step >= 1.8x faster, vtprune's overhead <= 3 % of the unpruned step."""
    lines = []
    for p in res["points"]:
        if p["budget"] != GOAL_BUDGET or p["status"] == "oracle":
            continue
        sp, spr = p["speedup"], p["extrapolated_real_depth"]["speedup"]
        x = p["extrapolated_real_depth"]
        over = {"selector": p["selector_share_of_unpruned_step"]}
        real = {"selector": x["selector_share_of_unpruned_step"]}
        if "vs_oracle" in p:  # pruned minus oracle: everything vtprune adds, not only the selector
            over["pruned - oracle"] = p["vs_oracle"]["share_of_unpruned_step"]
            real["pruned - oracle"] = p["vs_oracle"]["share_of_unpruned_step_real_depth_extrapolated"]
        if "overhead_estimate" in p:
            over["hooks + probe (estimate)"] = p["overhead_estimate"]["share_of_unpruned_step"]
            real["hooks + probe (estimate)"] = p["overhead_estimate"]["share_of_unpruned_step_real_depth_extrapolated"]
        worst = max(over.values())  # at the cut depth the unpruned step is shortest: the larger share

        def verdict(r: dict[str, Any]) -> str:
            # by the median; the p10/p90 range and the flag say how firmly
            return (f"{r['ratio']:.2f}x{r['flag']} [{r['lo']:.2f}-{r['hi']:.2f}] "
                    f"{'meets' if r['ratio'] >= GOAL_SPEEDUP else 'misses'}")

        lines.append(
            f"{p['method']:>10} @25%: speed-up measured (cut depth) {verdict(sp)}; extrapolated to real depth "
            f"{verdict(spr)}; overhead " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in over.items()) +
            " of the unpruned step (real depth: " + ", ".join(f"{100 * v:.2f} %" for v in real.values()) +
            f") -> {'meets' if worst <= GOAL_OVERHEAD else 'misses'} 3 %")
    return lines


def budget_axis(ax: Any, ylabel: str) -> None:
    """The kept share of each camera's tokens on a log2 x axis, 100 % on the left; grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 0.5, 0.25, 0.125], ["100%", "50%", "25%", "12.5%"])
    ax.invert_xaxis()
    ax.set_xlabel("visual tokens kept per camera")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(results: dict[str, Any], path: Path) -> str:
    """Latency vs budget per method: measured at the cut depth (solid) and extrapolated to the real depth (dashed,
    hollow markers), one row per policy. Returns what was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib is not importable ({e})"
    pols = [k for k in ("pi0", "action_tokens") if k in results]
    fig, axes = plt.subplots(len(pols), 2, figsize=(12, 4.2 * len(pols)), squeeze=False)
    for row, pol in zip(axes, pols):
        pts = [p for p in results[pol]["points"] if p["status"] == "measured"]
        base = next(p for p in pts if p["method"] == "none")
        for ax, real in zip(row, (False, True)):
            for method in dict.fromkeys(p["method"] for p in pts if p["method"] != "none"):
                ps = sorted((p for p in pts if p["method"] == method), key=lambda p: -p["budget"])
                xs = [1.0] + [p["budget"] for p in ps]
                ts = [(base["extrapolated_real_depth"] if real else base)["timing"]] + [
                    (p["extrapolated_real_depth"] if real else p)["timing"] for p in ps]
                med = [t["median_ms"] / 1e3 for t in ts]
                err = [[(t["median_ms"] - t["p10_ms"]) / 1e3 for t in ts], [(t["p90_ms"] - t["median_ms"]) / 1e3
                                                                           for t in ts]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=method, linestyle="--" if real else "-",
                            mfc="none" if real else None)
            u = (base["extrapolated_real_depth"] if real else base)["timing"]["median_ms"] / 1e3
            ax.plot([1.0], [u], "k*", ms=11, label="unpruned")
            ax.axhline(u / GOAL_SPEEDUP, color="grey", ls=":", lw=1, label=f"goal: unpruned / {GOAL_SPEEDUP:g}")
            depth = ", ".join(f"{k} {d[0 if not real else 1]}" for k, d in results[pol]["depths"].items())
            kind = "EXTRAPOLATED to real depth" if real else "measured (cut depth)"
            ax.set_title(f"{pol}: {kind}\nlayers: {depth}", fontsize=9)
            budget_axis(ax, "control step, s (median, p10-p90)")
            ax.set_ylim(bottom=0)
    env = results["env"]
    fig.suptitle(f"{env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
                 f"{env['dtype']} | {env['threads']} thread(s) | batch 1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (interleaved rounds)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, pinned and reported")
    ap.add_argument("--policies", default="pi0,action_tokens", help="comma list of pi0, action_tokens")
    ap.add_argument("--quick", action="store_true", help="tiny widths (seconds; the harness test)")
    ap.add_argument("--out", type=Path, default=Path("evals/results/policy_cpu.json"))
    a = ap.parse_args(argv)
    pols = a.policies.split(",")
    if bad := [p for p in pols if p not in ("pi0", "action_tokens")]:
        raise SystemExit(f"unknown policy {bad}; valid: pi0, action_tokens")
    _timing.pin_threads(a.threads)
    env = {**_timing.environment(), "batch": "1"}
    print(_timing.environment_line(env))
    print(_timing.method_line(a.repeats, 1))
    w_pi0, depth = (PI0_QUICK, PI0_DEPTH_QUICK) if a.quick else (PI0_REAL, PI0_DEPTH)
    w_llava = LLAVA_QUICK if a.quick else LLAVA_REAL
    res: dict[str, Any] = {"env": env, "timing": _timing.method_line(a.repeats, 1), "quick": a.quick,
                           "dtype": "float32", "budgets": list(BUDGETS),
                           "goal": f">= {GOAL_SPEEDUP}x faster control step at {GOAL_BUDGET:.0%} of the visual tokens, "
                                   f"vtprune's overhead <= {GOAL_OVERHEAD:.0%} of the unpruned step"}
    t0 = time.perf_counter()
    if "pi0" in pols:
        s = pi0_setup(w_pi0, depth, "measured")
        r = run_policy(s, a.repeats, GOAL_BUDGET)
        r["depths"] = s.depths
        r.update(config=dict(widths=w_pi0, depths=s.depths, cameras=w_pi0["cameras"],
                             tokens_per_camera=s.tokens_per_image,
                             prefix_tokens=int(s.inputs["input_ids"].shape[1]), chunk=w_pi0["chunk"],
                             denoising_steps=w_pi0["steps"], task=TASK, in_llm_layer_measured=K_MEASURED,
                             in_llm_layer_real=K_REAL, vla_pruner_options=VLA_OPTIONS,
                             config=s.model.config.to_dict()))
        print_table(f"pi0, cut to {depth['measured']} (SigLIP, Gemma/expert) layers; right: extrapolated to "
                    f"{depth['real']}", r)
        del s
        gc.collect()  # layer.forward wrappers make reference cycles: free the weights now
        # the extrapolation rule, checked against a measured deeper cut (unpruned and divprune at 25 %)
        d = pi0_setup(w_pi0, depth, "check", ("divprune",))
        deep = run_policy(d, a.repeats, None, (GOAL_BUDGET,))
        del d
        gc.collect()
        r["extrapolation_check"] = check_extrapolation(r, deep, depth)
        print(f"\nextrapolation check: predicted from {depth['measured']} layers vs measured at {depth['check']}:")
        for c in r["extrapolation_check"]["points"]:
            extra = (f"; speed-up predicted {c['predicted_speedup']:.2f}x, measured {c['measured_speedup']:.2f}x"
                     if "predicted_speedup" in c else "")
            print(f"  {c['method']:>9} @{c['budget'] or 1:g}: predicted {c['predicted_ms']:.0f} ms, measured "
                  f"{c['measured_ms']:.0f} ms [{c['measured']['p10_ms']:.0f}-{c['measured']['p90_ms']:.0f}], "
                  f"error {100 * c['error']:+.1f} %{extra}")
        r["goal_verdict"] = goal(r)
        print("\ngoal (pi0 at 25 %: >= 1.8x, overhead <= 3 %):")
        print("\n".join("  " + x for x in r["goal_verdict"]))
        res["pi0"] = r
    if "action_tokens" in pols:
        s = llava_setup(w_llava)
        r = run_policy(s, a.repeats, None)
        rv, rt = LLAVA_DEPTH["real"]
        r.update(config=dict(widths=w_llava, visual_tokens=s.tokens_per_image,
                             prompt_tokens=int(s.inputs["input_ids"].shape[1]), action_tokens=w_llava["actions"],
                             in_llm_layer_measured=K_MEASURED, in_llm_layer_real=K_REAL,
                             vla_pruner_options=VLA_OPTIONS, config=s.model.config.to_dict()),
                 depths={"clip": (LLAVA_DEPTH["measured"][0], rv), "llm": (LLAVA_DEPTH["measured"][1], rt)})
        print_table(f"action-token policy (LLaVA-1.5-7B widths), cut to {LLAVA_DEPTH['measured']} (CLIP, Llama) "
                    f"layers; right: extrapolated to {LLAVA_DEPTH['real']} (not checked against a deeper cut)", r)
        res["action_tokens"] = r
    res["wall_s"] = time.perf_counter() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=_jsonable))
    res["plot"] = plot(res, a.out.with_suffix(".png"))
    print(f"wrote {a.out}; {res['plot']}; {res['wall_s']:.0f} s")
    return res


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


if __name__ == "__main__":
    main()
