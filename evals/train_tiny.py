"""Train the shipped demo models from scratch on the synthetic visual-QA task (``vtprune/synth.py``).

    python evals/train_tiny.py --family llava --seed 0 --out vtprune/assets/llava --steps 2700 --pool 10000 --no-bf16 \
        --max-minutes 57 --eval-every 600 --attn-sup-until 0.9,1.0 --attn-sup-heads 0,1
    python evals/train_tiny.py --family qwen2_vl --seed 0 --out vtprune/assets/qwen2_vl --steps 3000 --pool 8000 \
        --no-bf16 --max-minutes 57 --eval-every 500 --attn-sup-until 0.9,1.0 --attn-sup-heads 0,1 --threads 2

are the commands of the shipped models, both on the same 2-core CPU, 57 min each: the LLaVA model with one thread
while the first Qwen2-VL model trained beside it (all 2700 planned steps ran); the Qwen2-VL model alone with both
cores, where the wall clock stopped it at step 2402 of its 3000-step schedule. ``--max-minutes`` is that wall-clock
stop, so a slower machine runs fewer of the planned steps; the step count that ran is in ``training.json``, and
``--stop-after 2402`` replays the shipped Qwen2-VL run on any machine without the clock (same schedule, same data;
float results vary slightly with the thread count). Use ``--no-bf16`` on CPUs without native bf16 (no
AVX512-BF16/AMX): bf16 autocast is emulated there and about 10x slower.

Real transformers classes, random init from a config (``vtprune.testing`` builders): ``LlavaForConditionalGeneration``
(CLIP-style ViT with [CLS], 224 px / patch 14 -> 256 visual tokens, MLP projector, Llama) and
``Qwen2VLForConditionalGeneration`` (Qwen2-VL ViT, 448 px / patch 14 / 2x2 merge -> 256 visual tokens, M-RoPE).

Recipe: a pool of training scenes is rendered once and kept as uint8 tensors; each training sequence is one image
followed by one question of every type in random order as a multi-turn chat (questions re-drawn on every visit), so
the first turn is exactly the one-question prompt used at test time; the loss covers only the answer tokens (and
their end-of-sequence token). Three training-only aids, discarded after training, give the from-scratch model dense
signals: linear heads on the visual tokens entering the LM (object class / colour / quadrant per token), attention
supervision of two LM heads toward what each question is about, and a turn probe (the colour an existence question
asks about, the named shape's colour or "absent", and its quadrant, read at each turn's last prompt token; without
it existence stayed at chance). AdamW, linear warm-up then cosine decay. Pixels are normalised / patchified in torch
exactly as the processor does (checked at start-up against the processor), and the prompt token ids are checked
against the processor's. At the end the held-out accuracy per question type is measured with the real processor and
``generate`` (``vtprune.demo_models.answer``), and the model, its processor and ``training.json`` (device, time,
steps, seed, versions, accuracy) are written to ``--out``. Progress goes to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtprune import synth as S  # noqa: E402
from vtprune.demo_models import IMAGE_SIZE, PROMPTS, answer  # noqa: E402

#: later turns of the training chat (the first turn is ``PROMPTS[family]``)
TURNS: dict[str, str] = {
    "llava": "USER: {q} ASSISTANT:",
    "qwen2_vl": "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
}
IMAGE_TOKEN: dict[str, str] = {"llava": "<image>", "qwen2_vl": "<|image_pad|>"}
N_VISUAL = 256

#: model sizes (the defaults of each family's command line)
SIZES: dict[str, dict[str, int]] = {
    "llava": {"vision_hidden": 128, "vision_layers": 4, "text_hidden": 256, "text_layers": 3},
    "qwen2_vl": {"vision_layers": 3, "text_hidden": 192, "text_layers": 3},
}


def build(family: str, sizes: dict[str, int], seed: int) -> tuple[torch.nn.Module, Any]:
    """A freshly initialised model of ``family`` and its processor (from the ``vtprune.testing`` builders).

    ``sizes`` may set ``lm_heads`` / ``lm_kv_heads`` (the builders use 4 / 2): the builder's config is then copied
    with those head counts (and, for Qwen2-VL, the M-RoPE sections re-split for the new head size) and the model is
    re-initialised from it with the same seed.
    """
    from vtprune.testing import tiny_llava, tiny_qwen2_vl

    if family == "llava":
        # vision_feature_layer = -2 as in LLaVA-1.5: the projector reads the penultimate ViT layer
        model, proc = tiny_llava("llava", image_size=224, patch_size=14, vision_hidden=sizes["vision_hidden"],
                                 vision_layers=sizes["vision_layers"], text_hidden=sizes["text_hidden"],
                                 text_layers=sizes["text_layers"], seed=seed)
    elif family == "qwen2_vl":
        model, proc = tiny_qwen2_vl("qwen2_vl", text_hidden=sizes["text_hidden"], text_layers=sizes["text_layers"],
                                    vision_depth=sizes["vision_layers"], seed=seed, max_tokens=N_VISUAL)
    else:
        raise ValueError(f"family must be 'llava' or 'qwen2_vl', got {family!r}")
    heads, kv = sizes.get("lm_heads", 4), sizes.get("lm_kv_heads", 2)
    if (heads, kv) != (4, 2):
        cfg = copy.deepcopy(model.config)
        tc = cfg.text_config
        tc.num_attention_heads, tc.num_key_value_heads = heads, kv
        tc.head_dim = tc.hidden_size // heads
        if family == "qwen2_vl":
            half = tc.head_dim // 2  # M-RoPE sections split head_dim/2 over (t, h, w) in Qwen's 2:3:3 ratio
            section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
            tc.rope_parameters = {**tc.rope_parameters, "mrope_section": section}
        torch.manual_seed(seed)
        model = type(model)._from_config(cfg, attn_implementation="sdpa").eval()
    return model, proc


class Batcher:
    """Turns pooled uint8 images and question lists into model inputs (pixels, token ids, answer-only labels)."""

    def __init__(self, family: str, processor: Any):
        self.family = family
        self.tok = processor.tokenizer
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_token_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN[family])
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def first_prompt_ids(self, question: str) -> list[int]:
        text = PROMPTS[self.family].format(q=question)
        return self.ids(text.replace(IMAGE_TOKEN[self.family], IMAGE_TOKEN[self.family] * N_VISUAL))

    def pixels(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B, H, W, 3] -> the processor's pixel inputs for the family."""
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std  # [B, 3, H, W]
        if self.family == "llava":
            return {"pixel_values": x}
        b, c, h, w = x.shape
        ps, m, t = 14, 2, 2
        gh, gw = h // ps, w // ps
        x = x[:, None].expand(b, t, c, h, w)  # a still image is repeated over the temporal patch
        x = x.reshape(b, t, c, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pv = x.reshape(b * gh * gw, c * t * ps * ps)
        return {"pixel_values": pv, "image_grid_thw": torch.tensor([[1, gh, gw]] * b)}

    def batch(self, images: torch.Tensor, qas: list[list[S.QA]], kinds: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """One multi-turn sequence per image; right-padded; labels only on answers (+ end of sequence).

        With ``kinds`` (the per-token object classes [B, 256] of :func:`cell_labels`) it also returns
        ``"attn_targets"``: (sample, position of the last prompt token of a turn, BoolTensor[256] of the visual
        tokens showing what the question is about) for the attention supervision. It always returns
        ``"turns"``: (sample, position of the last prompt token, QA) of every turn, for :class:`TurnProbe`.
        """
        seqs, labs, targets, turns = [], [], [], []
        for b, qa_list in enumerate(qas):
            seq: list[int] = []
            lab: list[int] = []
            for k, qa in enumerate(qa_list):
                p = self.first_prompt_ids(qa.question) if k == 0 else self.ids(TURNS[self.family].format(
                    q=qa.question))
                a = self.ids(qa.answer) + [self.eos]  # no leading space: see PROMPTS
                seq += p + a
                lab += [-100] * len(p) + a
                turns.append((b, len(seq) - len(a) - 1, qa))
                if kinds is not None:
                    tgt = referent_tokens(qa, kinds[b])
                    if tgt is not None:
                        targets.append((b, len(seq) - len(a) - 1, tgt))
            seqs.append(seq)
            labs.append(lab)
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labs)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(s)] = torch.tensor(lab)
            mask[i, :len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, **self.pixels(images)}
        if self.family == "qwen2_vl":
            out["mm_token_type_ids"] = (ids == self.image_token_id).long()
        if kinds is not None:
            out["attn_targets"] = targets
        out["turns"] = turns
        return out


def named_shape(qa: S.QA) -> str | None:
    """The shape kind a question names ("what colour is the circle?" -> "circle"), or None."""
    words = qa.question.rstrip("?").split()
    return next((k for k in S.SHAPES if k in words), None)


def referent_tokens(qa: S.QA, kinds: torch.Tensor) -> torch.Tensor | None:
    """Visual tokens showing what ``qa`` is about (named shape / all shapes / the dot), or None (absent shape)."""
    if qa.qtype == "counting":
        mask = (kinds >= 1) & (kinds <= len(S.SHAPES))
    elif qa.qtype == "detail":
        mask = kinds == len(S.SHAPES) + 1
    else:
        mask = kinds == S.SHAPES.index(named_shape(qa)) + 1
    return mask if bool(mask.any()) else None


def attention_supervision_loss(attn: torch.Tensor, targets: list, visual: torch.Tensor, heads: list[int]
                               ) -> torch.Tensor:
    """Mean over turns and ``heads`` of -log(attention mass the turn's last prompt token puts on the referent's
    visual tokens). ``attn`` [B, H, L, L] of one LM layer; ``visual`` [B, L] bool (image-token positions)."""
    losses = []
    for b, q, tgt in targets:
        pos = visual[b].nonzero().flatten()[tgt.to(torch.bool)]
        mass = attn[b, heads, q][:, pos].float().sum(-1)
        losses.append(-torch.log(mass + 1e-6).mean())
    return torch.stack(losses).mean() if losses else attn.new_zeros(())


def check_against_processor(batcher: Batcher, processor: Any, family: str, size: int) -> None:
    """The hand-made pixels and prompt ids must equal the processor's (what the model sees at test time)."""
    items = S.dataset("heldout", 3, seed=0, size=size)
    for it in items:
        ref = processor(images=[it.image], text=[PROMPTS[family].format(q=it.qa.question)], return_tensors="pt")
        arr = torch.from_numpy(np.array(it.image, dtype=np.uint8))[None]
        mine = batcher.pixels(arr)
        err = (mine["pixel_values"] - ref["pixel_values"]).abs().max().item()
        if err > 1e-5:
            raise RuntimeError(f"hand-made pixel_values differ from the processor's by {err}")
        if family == "qwen2_vl" and not torch.equal(mine["image_grid_thw"], ref["image_grid_thw"]):
            raise RuntimeError(f"image_grid_thw {mine['image_grid_thw']} != processor's {ref['image_grid_thw']}")
        if ref["input_ids"][0].tolist() != batcher.first_prompt_ids(it.qa.question):
            raise RuntimeError("prompt token ids differ from the processor's")
        if family == "qwen2_vl":
            b = batcher.batch(arr, [[it.qa]])
            if not torch.equal(b["mm_token_type_ids"][0, :ref["input_ids"].shape[1]], ref["mm_token_type_ids"][0]):
                raise RuntimeError("mm_token_type_ids differ from the processor's")


AUX_TARGETS = {"kind": len(S.SHAPES) + 2, "colour": len(S.COLOURS) + 1, "quadrant": 4}


def cell_labels(scene: S.Scene, grid: int = 16, cell: int = 14) -> np.ndarray:
    """Dense labels of the ``grid`` x ``grid`` visual tokens in raster order, uint8 [3, grid * grid]: object class
    (0 background, shape kind, dot) covering >= 15 % of the cell (the dot always gets its best cell), its colour
    class, and the cell's quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
    kind, colour = S.label_maps(scene, grid * cell)
    nk, nc = AUX_TARGETS["kind"], AUX_TARGETS["colour"]
    cov = np.eye(nk, dtype=np.int32)[kind].reshape(grid, cell, grid, cell, nk).sum((1, 3)).reshape(-1, nk)
    ccov = np.eye(nc, dtype=np.int32)[colour].reshape(grid, cell, grid, cell, nc).sum((1, 3)).reshape(-1, nc)
    obj = cov[:, 1:].argmax(1) + 1
    k = np.where(cov[:, 1:].max(1) >= 0.15 * cell * cell, obj, 0)
    k[cov[:, nk - 1].argmax()] = nk - 1
    c = np.where(k > 0, ccov[:, 1:].argmax(1) + 1, 0)
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    q = (rows >= grid // 2) * 2 + (cols >= grid // 2)
    return np.stack([k, c, q]).astype(np.uint8)


class AuxHead(torch.nn.Module):
    """Training-only dense heads on the visual tokens entering the language model (discarded after training):
    per-token object class / colour (/ quadrant). Gives the from-scratch vision tower a dense signal."""

    def __init__(self, dim: int, targets: list[str]):
        super().__init__()
        self.targets = targets
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(dim, AUX_TARGETS[t]) for t in targets})

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats [B, N, D], labels [B, 3, N] (kind, colour, quadrant) -> mean cross-entropy over targets."""
        idx = {"kind": 0, "colour": 1, "quadrant": 2}
        losses = [torch.nn.functional.cross_entropy(self.heads[t](feats).flatten(0, 1).float(),
                                                    labels[:, idx[t]].flatten().long()) for t in self.targets]
        return sum(losses) / len(losses)


class TurnProbe(torch.nn.Module):
    """Training-only linear heads on an LM layer's hidden state at each turn's last prompt token (discarded after
    training). They name the two facts a yes/no or left/right answer combines, so that each can be learnt on its
    own: the colour the question asks about (existence), and the named shape's actual colour (or "absent") and
    quadrant (attribute, existence, location). Without them the equality check of existence never left chance."""

    def __init__(self, dim: int):
        super().__init__()
        self.asked = torch.nn.Linear(dim, len(S.COLOURS))
        self.actual = torch.nn.Linear(dim, len(S.COLOURS) + 1)
        self.quadrant = torch.nn.Linear(dim, 4)

    @staticmethod
    def targets(turns: list, scenes: list[S.Scene]) -> torch.Tensor:
        """[T, 5] long: sample, position, asked colour, actual colour (len(COLOURS) = absent), quadrant; -100 where
        a target does not apply. ``scenes[b]`` is sample b's scene."""
        names = list(S.COLOURS)
        rows = []
        for b, pos, qa in turns:
            kind = named_shape(qa)
            if qa.qtype not in ("attribute", "existence", "location") or kind is None:
                continue
            shape = next((s for s in scenes[b].shapes if s.kind == kind), None)
            asked = names.index(qa.question.split()[-2]) if qa.qtype == "existence" else -100
            actual = names.index(shape.colour) if shape is not None else len(names)
            quad = -100 if shape is None else (shape.cy >= 0.5) * 2 + (shape.cx >= 0.5)
            rows.append([b, pos, asked, actual, quad])
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 5)

    def forward(self, hidden: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], tgt [T, 5] of :meth:`targets` -> mean cross-entropy of the three heads."""
        if len(tgt) == 0:
            return hidden.new_zeros(())
        h = hidden[tgt[:, 0], tgt[:, 1]].float()
        ce = torch.nn.functional.cross_entropy
        losses = [ce(head(h), tgt[:, k], ignore_index=-100) for head, k in
                  ((self.asked, 2), (self.actual, 3), (self.quadrant, 4)) if bool((tgt[:, k] >= 0).any())]
        return sum(losses) / len(losses)


def visual_tokens_module(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """The module whose output is the visual tokens fed to the language model (projector / patch merger)."""
    return model.model.multi_modal_projector if family == "llava" else model.model.visual.merger


def render_pool(n: int, seed: int, size: int) -> tuple[list[S.Scene], torch.Tensor, torch.Tensor]:
    """Training scenes ``0 .. n-1``, their pictures as one uint8 tensor [n, size, size, 3] and their dense token
    labels [n, 3, 256]."""
    scenes, pix = [], torch.empty((n, size, size, 3), dtype=torch.uint8)
    labels = torch.empty((n, 3, N_VISUAL), dtype=torch.uint8)
    t0 = time.time()
    for i in range(n):
        sc, _ = S.scene_qas("train", i, seed)
        scenes.append(sc)
        pix[i] = torch.from_numpy(np.array(S.render(sc, size), dtype=np.uint8))
        labels[i] = torch.from_numpy(cell_labels(sc))
        if (i + 1) % 2000 == 0:
            print(f"  rendered {i + 1}/{n} training scenes ({time.time() - t0:.0f} s)", flush=True)
    return scenes, pix, labels


def evaluate(model: torch.nn.Module, processor: Any, family: str, items: list[S.Item],
             batch_size: int = 32) -> dict[str, Any]:
    """Held-out accuracy per question type (and "all") with the real processor + greedy ``generate``."""
    model.eval()
    preds = answer(model, processor, [it.image for it in items], [it.qa.question for it in items], family,
                   max_new_tokens=8, batch_size=batch_size)
    res: dict[str, Any] = {}
    for t in (*S.QUESTION_TYPES, "all"):
        sel = [p == it.qa.answer for p, it in zip(preds, items) if t in ("all", it.qa.qtype)]
        res[t] = {"accuracy": sum(sel) / max(1, len(sel)), "n": len(sel)}
    return res


def fmt(res: dict[str, Any]) -> str:
    return " ".join(f"{t} {v['accuracy']:.3f}" for t, v in res.items())


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


def versions() -> dict[str, str]:
    import PIL
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, choices=sorted(PROMPTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default per family)")
    p.add_argument("--batch", type=int, default=8, help="images per step (each with 5 questions)")
    p.add_argument("--lr", type=float, default=1.2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--pool", type=int, default=None, help="training scenes rendered once (default per family)")
    p.add_argument("--eval-n", type=int, default=500, help="held-out items for the final accuracy")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop early (and say so) after this long")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (replays a run that --max-minutes stopped)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2-core machine is shared)")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the dense visual-token loss (0: off)")
    p.add_argument("--aux-targets", default=None, help="comma list of kind,colour,quadrant (default per family: "
                   "llava all three; qwen2_vl kind,colour so location must come from M-RoPE positions)")
    p.add_argument("--lm-aux-targets", default=None,
                   help="comma list of aux targets read from the visual tokens' hidden states after LM layer 0 "
                        "(default per family: qwen2_vl quadrant, so its LM learns where a token is from M-RoPE; "
                        "llava none); same weight as --aux-weight")
    p.add_argument("--attn-sup", type=float, default=1.0,
                   help="weight of the attention supervision (0: off): heads --attn-sup-heads of LM layer "
                        "--attn-sup-layer are pushed to attend from each turn's last prompt token to the visual "
                        "tokens of what the question is about; full weight until --attn-sup-until[0], then linearly "
                        "to 0 at --attn-sup-until[1] (fractions of the steps)")
    p.add_argument("--attn-sup-layer", type=int, default=1)
    p.add_argument("--attn-sup-heads", default="0,1")
    p.add_argument("--attn-sup-until", default="0.9,1.0")
    p.add_argument("--probe-weight", type=float, default=0.5,
                   help="weight of the training-only turn probe (asked colour, named shape's colour / absent and "
                        "quadrant read from LM layer --probe-layer's output at each turn's last prompt token; 0: off)")
    p.add_argument("--probe-layer", type=int, default=1)
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"])
    for k in ("vision_hidden", "vision_layers", "text_hidden", "text_layers", "lm_heads", "lm_kv_heads"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    a = p.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    family, size = a.family, IMAGE_SIZE[a.family]
    sizes = dict(SIZES[family])
    sizes.update({k: getattr(a, k) for k in ("vision_hidden", "vision_layers", "text_hidden", "text_layers",
                                             "lm_heads", "lm_kv_heads")
                  if getattr(a, k) is not None and (k in sizes or k.startswith("lm_"))})
    steps = a.steps or {"llava": 2700, "qwen2_vl": 3000}[family]
    pool_n = a.pool or {"llava": 10000, "qwen2_vl": 8000}[family]
    if a.stop_after is not None and not 1 <= a.stop_after <= steps:
        p.error(f"--stop-after must be between 1 and --steps ({steps}), got {a.stop_after}")
    t_start = time.time()

    model, processor = build(family, sizes, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"family {family} | sizes {sizes} | params {n_params / 1e6:.2f} M | steps {steps} x batch {a.batch} "
          f"images (5 questions each) | lr {a.lr} | seed {a.seed} | threads {a.threads}", flush=True)
    batcher = Batcher(family, processor)
    check_against_processor(batcher, processor, family, size)
    print("hand-made pixels and prompt ids match the processor", flush=True)
    scenes, pool, pool_labels = render_pool(pool_n, a.seed, size)
    heldout = S.dataset("heldout", a.eval_n, seed=a.seed, size=size)
    quick = heldout[:150]
    print(f"pool of {pool_n} training scenes ({pool.numel() / 2**20:.0f} MiB), {len(heldout)} held-out items "
          f"({time.time() - t_start:.0f} s)", flush=True)

    aux_targets = (a.aux_targets or {"llava": "kind,colour,quadrant", "qwen2_vl": "kind,colour"}[family]).split(",")
    aux = AuxHead(model.config.text_config.hidden_size, aux_targets)
    lm_targets = [t for t in (a.lm_aux_targets if a.lm_aux_targets is not None
                              else {"llava": "", "qwen2_vl": "quadrant"}[family]).split(",") if t]
    lm_aux = AuxHead(model.config.text_config.hidden_size, lm_targets) if lm_targets else None
    captured: dict[str, torch.Tensor] = {}
    visual_tokens_module(model, family).register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))
    if lm_aux is not None:
        model.model.language_model.layers[1].register_forward_pre_hook(
            lambda m, args, kw: captured.__setitem__("h", args[0] if args else kw["hidden_states"]), with_kwargs=True)
    probe = TurnProbe(model.config.text_config.hidden_size) if a.probe_weight > 0 else None
    if probe is not None:
        model.model.language_model.layers[a.probe_layer].register_forward_hook(
            lambda m, i, o: captured.__setitem__("probe", o[0] if isinstance(o, tuple) else o))
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    if probe is not None:
        named += [("probe." + n, p) for n, p in probe.named_parameters()]
    if lm_aux is not None:
        named += [("lm_aux." + n, p) for n, p in lm_aux.named_parameters()]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98))
    sup_start, sup_end = (float(x) for x in a.attn_sup_until.split(","))
    sup_heads = [int(h) for h in a.attn_sup_heads.split(",")]
    sup_on = False
    rng = np.random.default_rng([a.seed, 1234])
    history, t_train, done, ema = [], time.time(), 0, None
    for step in range(steps):
        idx = rng.integers(pool_n, size=a.batch)
        qas = []
        for i in idx:
            qrng = np.random.default_rng([a.seed, 99, int(i), step])
            order = qrng.permutation(len(S.QUESTION_TYPES))
            qas.append([S.ask(scenes[i], S.QUESTION_TYPES[j], qrng) for j in order])
        sel = torch.from_numpy(idx)
        w_att = a.attn_sup * float(np.clip((sup_end - step / steps) / max(1e-9, sup_end - sup_start), 0.0, 1.0))
        batch = batcher.batch(pool[sel], qas, kinds=pool_labels[sel, 0] if w_att > 0 else None)
        targets = batch.pop("attn_targets", None)
        turns = batch.pop("turns")
        if (w_att > 0) != sup_on:  # eager LM attention only while the supervision needs the probabilities
            sup_on = w_att > 0
            model.set_attn_implementation({"text_config": "eager" if sup_on else "sdpa"})
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, a.lr, a.warmup)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.no_bf16):
            out = model(**batch, output_attentions=sup_on)
            loss = out.loss
            aux_loss = aux(captured.pop("v").reshape(len(idx), N_VISUAL, -1), pool_labels[sel]) \
                if a.aux_weight > 0 else torch.zeros(())
            h = captured.pop("h", None)
            if lm_aux is not None and a.aux_weight > 0:
                vis = batch["input_ids"] == batcher.image_token_id  # exactly N_VISUAL per row, raster order
                aux_loss = aux_loss + lm_aux(h[vis].reshape(len(idx), N_VISUAL, -1), pool_labels[sel])
            att_loss = attention_supervision_loss(out.attentions[a.attn_sup_layer], targets,
                                                  batch["input_ids"] == batcher.image_token_id, sup_heads) \
                if sup_on else torch.zeros(())
            probe_loss = probe(captured.pop("probe"), TurnProbe.targets(turns, [scenes[i] for i in idx])) \
                if probe is not None else torch.zeros(())
        (loss + a.aux_weight * aux_loss + w_att * att_loss + a.probe_weight * probe_loss).backward()
        gn = torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        el = time.time() - t_train
        if done % 25 == 0 or done == 1:
            print(f"step {done:5d}/{steps} loss {loss.item():.4f} (ema {ema:.4f}) aux {aux_loss.item():.3f} "
                  f"att {att_loss.item():.3f} probe {probe_loss.item():.3f} "
                  f"grad {gn:.2f} lr {opt.param_groups[0]['lr']:.2e} | "
                  f"{el / done:.2f} s/step, {el / 60:.1f} min", flush=True)
        if done % a.eval_every == 0 and done < steps:
            res = evaluate(model, processor, family, quick)
            history.append({"step": done, "loss_ema": ema, "minutes": el / 60, "quick_heldout": res})
            print(f"  held-out (first {len(quick)}): {fmt(res)}", flush=True)
        if (time.time() - t_start) / 60 > a.max_minutes:
            print(f"stopping early at step {done}: --max-minutes {a.max_minutes} reached", flush=True)
            break
        if a.stop_after is not None and done >= a.stop_after:
            print(f"stopping at step {done} of the {steps}-step schedule: --stop-after", flush=True)
            break
    train_s = time.time() - t_train
    if sup_on:
        model.set_attn_implementation({"text_config": "sdpa"})
    t_eval = time.time()
    res = evaluate(model, processor, family, heldout)
    eval_s = time.time() - t_eval
    print(f"final held-out accuracy (n={len(heldout)}): {fmt(res)}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    model = model.to(getattr(torch, a.save_dtype))
    model.config.dtype = a.save_dtype
    model.save_pretrained(a.out)
    processor.save_pretrained(a.out)
    model.to(torch.float32)
    record = {
        "family": family,
        "architecture": type(model).__name__,
        "params": n_params,
        "sizes": sizes,
        "visual_tokens_per_image": N_VISUAL,
        "image_size": size,
        "prompt": PROMPTS[family],
        "seed": a.seed,
        "command": "python evals/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": done,
        "steps_planned": steps,
        "batch_images": a.batch,
        "questions_per_image": len(S.QUESTION_TYPES),
        "precision": "fp32 weights, " + ("fp32 compute" if a.no_bf16 else "bf16 autocast") + " in training; "
                     "evaluated in fp32",
        "optimizer": {"name": "AdamW", "lr": a.lr, "betas": [0.9, 0.98], "weight_decay": a.weight_decay,
                      "warmup": a.warmup, "schedule": "linear warm-up, cosine to 5%", "grad_clip": 1.0},
        "train_pool_scenes": pool_n,
        "attention_supervision": {"weight": a.attn_sup, "layer": a.attn_sup_layer, "heads": sup_heads,
                                  "full_until": sup_start, "zero_from": sup_end,
                                  "what": "-log of the attention mass that each turn's last prompt token puts on "
                                          "the visual tokens of the named shape / all shapes / the dot; full weight "
                                          "until full_until, linearly to 0 at zero_from (fractions of the steps)"},
        "aux_loss": {"weight": a.aux_weight, "targets": aux_targets, "lm_layer0_targets": lm_targets,
                     "what": "training-only linear heads on the visual tokens entering the LM predict each token's "
                             "object class / colour / quadrant from the scene geometry (lm_layer0_targets: the "
                             "same from the visual tokens' hidden states after LM layer 0); discarded after training"},
        "turn_probe": {"weight": a.probe_weight, "layer": a.probe_layer,
                       "what": "training-only linear heads on LM layer `layer`'s output at each turn's last prompt "
                               "token: the colour an existence question asks about, the named shape's actual "
                               "colour (or absent) and its quadrant; discarded after training"},
        "loss_ema_final": ema,
        "train_minutes": round(train_s / 60, 2),
        "total_minutes": round((time.time() - t_start) / 60, 2),
        "eval_seconds": round(eval_s, 1),
        "device": f"CPU ({platform.processor() or platform.machine()}, {a.threads} threads, {os.cpu_count()} cores "
                  "shared with other work)",
        "versions": versions(),
        "saved_dtype": a.save_dtype,
        "heldout": {"split": "heldout", "seed": a.seed, "n": len(heldout), "accuracy": res},
        "history": history,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (a.out / "training.json").write_text(json.dumps(record, indent=1))
    print(f"saved {a.out} ({sum(f.stat().st_size for f in a.out.iterdir()) / 2**20:.1f} MiB) in "
          f"{(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
