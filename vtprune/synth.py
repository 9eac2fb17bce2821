"""Synthetic visual question answering: seeded scenes of coloured shapes on textured backgrounds.

Pure PIL + numpy, deterministic for a seed. Every scene has 1–4 shapes of distinct kinds (so "the circle" is
unambiguous), each in its own quadrant of the picture, of several sizes and colours, plus one small dot. Five
question types, each needing a different visual skill, all with single-word answers:

=============  =================================================  ======================================
type           question                                           answers
=============  =================================================  ======================================
``attribute``  ``what colour is the circle?``                     red, green, blue, yellow, purple
``existence``  ``is there a red circle?``                         yes, no (balanced; half the "no" are
                                                                  a present shape in another colour)
``counting``   ``how many shapes are there?`` (dot not counted)   1, 2, 3, 4
``location``   ``is the circle left or right?`` /                 left, right, top, bottom
               ``is the circle top or bottom?``
``detail``     ``what colour is the small dot?``                  red, green, blue, yellow, purple
=============  =================================================  ======================================

Scenes are laid out in normalised coordinates and rendered at any size (224 px for a LLaVA-style ViT with 14-px
patches -> 256 tokens; 448 px for Qwen2-VL with 14-px patches and 2x2 merging -> 256 tokens), so the same scene
looks the same at both sizes. Item ``i`` of a split is generated from ``numpy.random.default_rng([seed, split, i])``,
so items can be made independently and in any order; the train and held-out splits use different split ids.

Run ``python evals/synth_vqa.py --out /tmp/synth`` (or ``python -m vtprune.synth``) to write a few examples as
PNGs with their questions.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 170, 50),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 45, 190),
}
QUESTION_TYPES: tuple[str, ...] = ("attribute", "existence", "counting", "location", "detail")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
#: every answer the generator can produce
ANSWERS: tuple[str, ...] = (*COLOURS, "yes", "no", "1", "2", "3", "4", "left", "right", "top", "bottom")


@dataclass
class Shape:
    """One shape: kind, colour name, centre (cx, cy) and radius, all in [0, 1] image coordinates."""

    kind: str
    colour: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    """A full scene description (everything needed to render it and to ask about it)."""

    shapes: list[Shape]
    dot_colour: str
    dot_xy: tuple[float, float]
    dot_r: float
    bg: dict = field(default_factory=dict)


@dataclass
class QA:
    """A question about a scene, its single-word answer and its type."""

    question: str
    answer: str
    qtype: str


@dataclass
class Item:
    """One held-out item: a scene, its picture and one question."""

    index: int
    scene: Scene
    image: Image.Image
    qa: QA


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: 1–4 shapes of distinct kinds, one per quadrant, plus a small dot in free space."""
    n = int(rng.integers(1, 5))
    kinds = rng.choice(len(SHAPES), size=n, replace=False)
    quads = rng.choice(4, size=n, replace=False)
    names = list(COLOURS)
    shapes = []
    for k, q in zip(kinds, quads):
        r = float(rng.uniform(0.085, 0.16))
        # centre inside the quadrant, at least r + 0.035 from its edges (so it is clearly on one side)
        lo, hi = r + 0.035, 0.5 - r - 0.035
        cx = float(rng.uniform(lo, hi)) + 0.5 * (q % 2)
        cy = float(rng.uniform(lo, hi)) + 0.5 * (q // 2)
        shapes.append(Shape(SHAPES[int(k)], names[int(rng.integers(len(names)))], cx, cy, r))
    dot_r = 0.032
    for _ in range(200):
        dx, dy = (float(v) for v in rng.uniform(0.06, 0.94, size=2))
        if all(np.hypot(dx - s.cx, dy - s.cy) > s.r * 1.45 + dot_r + 0.02 for s in shapes):
            break
    bg = {
        "base": [float(v) for v in rng.uniform(95, 175) + rng.uniform(-18, 18, size=3)],
        "amp": float(rng.uniform(8, 22)),
        "freq": [float(v) for v in rng.uniform(4, 14, size=2)],
        "phase": [float(v) for v in rng.uniform(0, 2 * np.pi, size=2)],
        "noise": float(rng.uniform(3, 9)),
        "noise_seed": int(rng.integers(2**31)),
    }
    return Scene(shapes, names[int(rng.integers(len(names)))], (dx, dy), dot_r, bg)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def _paint(d: ImageDraw.ImageDraw, scene: Scene, size: int, fills: list, dot_fill: object) -> None:
    """Draw the shapes (fill ``fills[i]`` for shape i) and the dot of ``scene`` at ``size`` pixels."""
    for s, fill in zip(scene.shapes, fills):
        cx, cy, r = s.cx * size, s.cy * size, s.r * size
        if s.kind == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            h = r * 0.85
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif s.kind == "triangle":
            d.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
        elif s.kind == "star":
            d.polygon(_star(cx, cy, r * 1.1), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {s.kind!r}")
    (dx, dy), dr = scene.dot_xy, scene.dot_r * size
    d.ellipse([dx * size - dr, dy * size - dr, dx * size + dr, dy * size + dr], fill=dot_fill)


def render(scene: Scene, size: int = 224) -> Image.Image:
    """The scene as an RGB picture of ``size`` x ``size`` pixels (deterministic)."""
    bg = scene.bg
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    wave = np.sin(2 * np.pi * bg["freq"][0] * xx + bg["phase"][0]) * np.cos(2 * np.pi * bg["freq"][1] * yy
                                                                            + bg["phase"][1])
    arr = np.asarray(bg["base"], np.float32)[None, None, :] + bg["amp"] * wave[..., None]
    noise = np.random.default_rng(bg["noise_seed"]).normal(0, bg["noise"], size=(size, size, 3))
    img = Image.fromarray((arr + noise).clip(0, 255).astype(np.uint8), "RGB")
    _paint(ImageDraw.Draw(img), scene, size, [COLOURS[s.colour] for s in scene.shapes], COLOURS[scene.dot_colour])
    return img


def label_maps(scene: Scene, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (object class, colour class) maps, uint8 [size, size]: object 0 = background, 1..len(SHAPES) =
    shape kind, len(SHAPES) + 1 = the dot; colour 0 = background, 1.. = index in :data:`COLOURS` + 1."""
    kind = Image.new("L", (size, size), 0)
    _paint(ImageDraw.Draw(kind), scene, size, [SHAPES.index(s.kind) + 1 for s in scene.shapes], len(SHAPES) + 1)
    colour = Image.new("L", (size, size), 0)
    names = list(COLOURS)
    _paint(ImageDraw.Draw(colour), scene, size, [names.index(s.colour) + 1 for s in scene.shapes],
           names.index(scene.dot_colour) + 1)
    return np.asarray(kind), np.asarray(colour)


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> QA:
    """One question of type ``qtype`` about ``scene`` (randomness from ``rng``)."""
    shapes = scene.shapes
    if qtype == "attribute":
        s = shapes[int(rng.integers(len(shapes)))]
        return QA(f"what colour is the {s.kind}?", s.colour, qtype)
    if qtype == "existence":
        mode = int(rng.integers(4))  # 0, 1: yes; 2: present kind, other colour; 3: absent kind
        absent = [k for k in SHAPES if k not in {s.kind for s in shapes}]
        if mode == 3 and not absent:
            mode = 2
        if mode < 2:
            s = shapes[int(rng.integers(len(shapes)))]
            return QA(f"is there a {s.colour} {s.kind}?", "yes", qtype)
        if mode == 2:
            s = shapes[int(rng.integers(len(shapes)))]
            others = [c for c in COLOURS if c != s.colour]
            return QA(f"is there a {others[int(rng.integers(len(others)))]} {s.kind}?", "no", qtype)
        kind = absent[int(rng.integers(len(absent)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        return QA(f"is there a {colour} {kind}?", "no", qtype)
    if qtype == "counting":
        return QA("how many shapes are there?", str(len(shapes)), qtype)
    if qtype == "location":
        s = shapes[int(rng.integers(len(shapes)))]
        if int(rng.integers(2)) == 0:
            return QA(f"is the {s.kind} left or right?", "left" if s.cx < 0.5 else "right", qtype)
        return QA(f"is the {s.kind} top or bottom?", "top" if s.cy < 0.5 else "bottom", qtype)
    if qtype == "detail":
        return QA("what colour is the small dot?", scene.dot_colour, qtype)
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def scene_qas(split: str, index: int, seed: int = 0) -> tuple[Scene, list[QA]]:
    """Scene ``index`` of ``split`` with one question of every type (the training view of a scene)."""
    rng = _rng(seed, split, index)
    scene = make_scene(rng)
    return scene, [ask(scene, t, rng) for t in QUESTION_TYPES]


def item(split: str, index: int, seed: int = 0, size: int = 224) -> Item:
    """Item ``index`` of ``split``: its question type cycles through :data:`QUESTION_TYPES`."""
    rng = _rng(seed, split, index)
    scene = make_scene(rng)
    qa = ask(scene, QUESTION_TYPES[index % len(QUESTION_TYPES)], rng)
    return Item(index, scene, render(scene, size), qa)


def dataset(split: str, n: int, seed: int = 0, size: int = 224, start: int = 0) -> list[Item]:
    """Items ``start .. start + n - 1`` of ``split`` (question types balanced when ``n`` is a multiple of 5)."""
    return [item(split, i, seed, size) for i in range(start, start + n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("synth_examples"))
    p.add_argument("--split", default="heldout", choices=sorted(SPLITS))
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for it in dataset(a.split, a.n, a.seed, a.size):
        it.image.save(a.out / f"{a.split}_{it.index:04d}.png")
        rows.append({"index": it.index, **asdict(it.qa)})
        print(f"{it.index:4d} [{it.qa.qtype:>9}] {it.qa.question:<36} -> {it.qa.answer}")
    (a.out / "qa.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
