"""Regenerate the vtprune_synth task data: 24 small PNGs of one coloured shape each, plus ``test.jsonl``.

    python evals/tasks/vtprune_synth/make_data.py

Deterministic (fixed layout table, no RNG), so re-running reproduces the committed files byte for byte. Every
question has a single-word answer and a four-way choice list, so the same rows serve the generation task
(``vtprune_synth``, exact match) and the log-likelihood task (``vtprune_synth_mc``, multiple choice).

This is a small, self-contained stand-in for CI and smoke runs of the lmms-eval plugin; it is not a benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 112  # 4x4 LLM tokens for Qwen2-VL (28 px per token) and a 56-px resize for the tiny LLaVA: both 16 tokens

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((245, 245, 245), (40, 40, 40))  # light and dark, so colour is not confounded with contrast
N_ROWS = 24


def draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], offset: int) -> Image.Image:
    """One shape, about half the picture wide, shifted by ``offset`` pixels so pictures are not all centred."""
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    lo, hi = 28 + offset, 84 + offset
    if shape == "circle":
        d.ellipse([lo, lo, hi, hi], fill=colour)
    elif shape == "square":
        d.rectangle([lo, lo, hi, hi], fill=colour)
    else:
        d.polygon([((lo + hi) // 2, lo), (lo, hi), (hi, hi)], fill=colour)
    return img


def rows() -> list[dict]:
    """The task rows: the 12 colour x shape combinations, once on a light and once on a dark background; each
    combination is asked for its colour on one background and for its shape on the other."""
    out = []
    colours = list(COLOURS)
    for i in range(N_ROWS):
        combo, dark = i % 12, i // 12
        colour, shape = colours[combo % len(colours)], SHAPES[combo // len(colours)]
        if (i + dark) % 2 == 0:
            question, answer, choices = f"What colour is the {shape}?", colour, colours
        else:
            question, answer, choices = "What shape is in the picture?", shape, [*SHAPES, "star"]
        out.append({"id": i, "image": f"images/{i:02d}.png", "question": question, "answer": answer,
                    "choices": list(choices), "answer_idx": list(choices).index(answer),
                    "shape": shape, "colour": colour, "background": "dark" if dark else "light",
                    "offset": (i % 3 - 1) * 10})
    return out


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    data = rows()
    for r in data:
        bg = BACKGROUNDS[0] if r["background"] == "light" else BACKGROUNDS[1]
        draw(r["shape"], COLOURS[r["colour"]], bg, r["offset"]).save(HERE / r["image"], optimize=True)
    with open(HERE / "test.jsonl", "w", encoding="utf-8") as f:
        for r in data:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    print(f"wrote {len(data)} rows and images to {HERE}")


if __name__ == "__main__":
    main()
