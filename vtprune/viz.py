"""Pictures of what was kept: each grid segment of an image's tokens drawn over the image, dropped patches dimmed."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from .report import ImageReport


def kept_grids(im: ImageReport) -> list[torch.Tensor]:
    """BoolTensor[h, w] per grid segment (LLaVA: one; LLaVA-NeXT: base image, then the unpadded crop map)."""
    n = im.n_before
    keep = torch.zeros(n, dtype=torch.bool)
    keep[im.kept.cpu()] = True
    if im.newline is not None:
        keep = keep[~im.newline.cpu()]
    grid = im.grid
    side = int(round(keep.numel() ** 0.5))
    if grid is None and side * side == keep.numel():  # in-LLM stages carry no layout; a square is one grid
        grid = (side, side)
    if grid is None:
        raise ValueError("this image's tokens have no spatial grid to draw")
    segs = grid if isinstance(grid, list) else [grid]
    out, start = [], 0
    for h, w in segs:
        out.append(keep[start:start + h * w].view(h, w))
        start += h * w
    return out


def overlay(image: Image.Image, kept: torch.Tensor, dim: float = 0.25, size: int = 336) -> Image.Image:
    """Draw ``kept[h, w]`` over ``image`` (resized to ``size`` on its long side).

    Dropped cells are dimmed, kept cells outlined."""
    h, w = kept.shape
    scale = size / max(image.size)
    img = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    dark = Image.eval(img, lambda v: int(v * dim))
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    cw, ch = img.width / w, img.height / h
    for y, x in kept.nonzero().tolist():
        draw.rectangle([x * cw, y * ch, (x + 1) * cw - 1, (y + 1) * ch - 1], fill=255)
    out = Image.composite(img, dark, mask)
    edge = ImageDraw.Draw(out)
    for y, x in kept.nonzero().tolist():
        edge.rectangle([x * cw, y * ch, (x + 1) * cw - 1, (y + 1) * ch - 1], outline=(255, 64, 64))
    return out


def panel(image: Image.Image, im: ImageReport, title: str = "", size: int = 336) -> Image.Image:
    """All grid segments of one image side by side, with a title line."""
    tiles = [overlay(image, g, size=size) for g in kept_grids(im)]
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    height = max(t.height for t in tiles) + 18
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 18))
        x += t.width + 4
    ImageDraw.Draw(canvas).text((2, 2), title or f"{im.method} {im.n_after}/{im.n_before}", fill=(0, 0, 0))
    return canvas


def stack(panels: list[Image.Image], columns: int = 4) -> Image.Image:
    """Panels in a grid, row by row."""
    columns = max(1, min(columns, len(panels)))
    cw = max(p.width for p in panels)
    chh = max(p.height for p in panels)
    rows = (len(panels) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (cw + 6), rows * (chh + 6)), (255, 255, 255))
    for i, p in enumerate(panels):
        canvas.paste(p, ((i % columns) * (cw + 6), (i // columns) * (chh + 6)))
    return canvas
