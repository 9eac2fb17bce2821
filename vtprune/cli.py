"""`vtprune demo` and `vtprune viz`.

demo: a small LLaVA built from a config (random weights until the project's trained default ships) is run on a
synthetic scene unpruned and pruned at several budgets; prints visual tokens, prefill time and speed-up side by
side and writes PNGs of the kept patches.
viz: the same picture for a user's image, model and method.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def scene(size: int = 336, seed: int = 0):
    """A synthetic picture: a few coloured shapes on a textured background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    bg = np.stack([120 + 40 * np.sin(xx / 23.0), 140 + 30 * np.cos(yy / 17.0), 160 + 20 * np.sin((xx + yy) / 31.0)], -1)
    bg += rng.normal(0, 6, bg.shape)
    img = Image.fromarray(bg.clip(0, 255).astype("uint8"), "RGB")
    d = ImageDraw.Draw(img)
    s = size / 336
    d.ellipse([40 * s, 50 * s, 130 * s, 140 * s], fill=(220, 40, 40))
    d.rectangle([200 * s, 60 * s, 290 * s, 150 * s], fill=(40, 60, 220))
    d.polygon([(170 * s, 200 * s), (120 * s, 300 * s), (220 * s, 300 * s)], fill=(40, 180, 60))
    d.ellipse([260 * s, 250 * s, 280 * s, 270 * s], fill=(250, 220, 30))
    return img


DESCRIPTION = {
    "llava": "LLaVA architecture built from a config (CLIP-style ViT 336/14 -> 576 visual tokens, 8-layer Llama h512)",
    "qwen2_vl": "Qwen2-VL architecture built from a config (ViT 14 px + 2x2 merger, 336 px -> 144 visual tokens, "
                "M-RoPE, 8-layer LM h512)",
}
BUDGETS = {"llava": "288,144,64,29", "qwen2_vl": "72,36,16,8"}
TEMPLATE = {"llava": "USER: <image>\n{q} ASSISTANT:",
            "qwen2_vl": "<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>"
                        "<|im_start|>assistant"}


def demo_model(family: str = "llava"):
    """A small model of ``family`` at real token layouts (random weights until the trained default ships)."""
    from .testing import tiny_llava, tiny_qwen2_vl

    if family == "llava":
        return tiny_llava("llava", image_size=336, patch_size=14, vision_hidden=128, vision_layers=2,
                          text_hidden=512, text_layers=8)
    if family == "qwen2_vl":
        return tiny_qwen2_vl("qwen2_vl", text_hidden=512, text_layers=8, max_tokens=144)
    raise ValueError(f"demo family must be one of {sorted(DESCRIPTION)}, got {family!r}")


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def header() -> str:
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, " \
        f"{torch.get_num_threads()} threads)"
    return (f"device: {dev} | python {platform.python_version()} | torch {torch.__version__} | "
            f"transformers {transformers.__version__} | dtype float32")


def run_demo(out: Path, budgets: list[int], methods: list[str], repeats: int, family: str = "llava") -> None:
    import vtprune

    from .viz import panel, stack

    out.mkdir(parents=True, exist_ok=True)
    model, proc = demo_model(family)
    img = scene()
    inputs = proc(images=[img], text=[TEMPLATE[family].format(q="What colour is the circle?")], return_tensors="pt")
    print(header())
    print(f"model: {DESCRIPTION[family]}; random weights, so answers are not meaningful — the trained default "
          "replaces it later\n")
    with torch.no_grad():
        base_ms = _time_ms(lambda: model(**inputs), repeats)
        base_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"{'method':>10} {'keep':>5} {'visual':>10} {'LLM tokens':>10} {'prefill ms':>10} {'speed-up':>8} "
          f"{'FLOPs':>7} {'same answer':>11}")
    print(f"{'none':>10} {'all':>5} {f'{n_vis}->{n_vis}':>10} {n_prompt:>10} {base_ms:>10.1f} {'1.00x':>8} {'100%':>7} "
          f"{'-':>11}")
    panels = []
    for method in methods:
        for keep in budgets:
            vtprune.prune(model, method=method, keep=keep)
            with torch.no_grad():
                ms = _time_ms(lambda: model(**inputs), repeats)
                ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            rep = vtprune.last_report(model)
            im = rep.images[0]
            same = "yes" if torch.equal(ids[:, n_prompt:], base_ids[:, n_prompt:]) else "no"
            print(f"{method:>10} {keep:>5} {f'{im.n_before}->{im.n_after}':>10} {rep.tokens_after[0]:>10} "
                  f"{ms:>10.1f} {base_ms / ms:>7.2f}x {rep.flops_ratio:>7.1%} {same:>11}", flush=True)
            panels.append(panel(img, im, f"{method} keep {keep}"))
            panels[-1].save(out / f"kept_{method}_{keep}.png")
            vtprune.unprune(model)
    stack(panels, columns=len(budgets)).save(out / "kept_all.png")
    print(f"\npictures: {out}/kept_all.png and one kept_<method>_<keep>.png per row")


def run_viz(image: Path, method: str, keep: int, model_name: str, out: Path, question: str) -> None:
    from PIL import Image

    import vtprune

    from .viz import panel

    if model_name in ("demo", "llava", "llava_next"):
        from .testing import tiny_llava

        model, proc = demo_model() if model_name == "demo" else tiny_llava(model_name)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(model_name).eval()
        proc = AutoProcessor.from_pretrained(model_name)
    img = Image.open(image).convert("RGB")
    inputs = proc(images=[img], text=[f"USER: <image>\n{question} ASSISTANT:"], return_tensors="pt")
    vtprune.prune(model, method=method, keep=keep)
    with torch.no_grad():
        model(**inputs)
    rep = vtprune.last_report(model)
    print(rep)
    out.parent.mkdir(parents=True, exist_ok=True)
    panel(img, rep.images[0], f"{method} keep {keep}").save(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vtprune", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="prune the default model at several budgets; print speed-ups; write pictures")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--family", default="llava", choices=sorted(DESCRIPTION), help="model family of the demo model")
    d.add_argument("--budgets", default=None, help="comma-separated visual tokens per image (default per family)")
    d.add_argument("--methods", default="fastervlm,divprune,holov,vflowopt,uniform,random,fastv")
    d.add_argument("--repeats", type=int, default=3)
    v = sub.add_parser("viz", help="picture of the tokens a method keeps on your image")
    v.add_argument("image", type=Path)
    v.add_argument("--method", default="fastervlm")
    v.add_argument("--keep", type=int, default=64)
    v.add_argument("--model", default="demo", help="'demo', 'llava', 'llava_next' or a local model directory")
    v.add_argument("--question", default="Describe the image.")
    v.add_argument("--out", type=Path, default=Path("demo_out/viz.png"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if a.cmd == "demo":
        budgets = a.budgets or BUDGETS[a.family]
        run_demo(a.out, [int(x) for x in budgets.split(",")], a.methods.split(","), a.repeats, a.family)
    else:
        run_viz(a.image, a.method, a.keep, a.model, a.out, a.question)


if __name__ == "__main__":
    main()
