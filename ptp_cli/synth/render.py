"""Drawing a ``Scene``: a quiet background (flat, gradient or light texture), then its objects.

Glyphs come from a built-in 5x7 bitmap font, so images are identical on every machine (no system fonts).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ptp_cli.synth.scene import COLOURS, Obj, Scene

# 5x7 bitmaps, one string of 7 rows per glyph ("#" = ink).
FONT: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
}
_DARK_INK = {"yellow", "orange"}  # light objects get black glyphs, the others white


def _light_colour(rng: np.random.Generator) -> np.ndarray:
    """A pale, low-saturation colour: grey 150..235 with a faint tint."""
    return np.clip(rng.uniform(150, 235) + rng.uniform(-14, 14, size=3), 0, 255)


def background(scene: Scene) -> np.ndarray:
    """[H, W, 3] float pixels of the scene's background."""
    rng = np.random.default_rng(scene.render_seed)
    h, w = scene.height, scene.width
    a = _light_colour(rng)
    if scene.background == "flat":
        return np.broadcast_to(a, (h, w, 3)).copy()
    if scene.background == "gradient":
        b = _light_colour(rng)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)  # [H, W] in [0, 1]
        return a * (1 - t[..., None]) + b * t[..., None]
    if scene.background == "texture":
        # Smooth blotches: coarse noise, bilinearly enlarged (no per-pixel grain: PNGs stay small).
        coarse = rng.normal(0, 12, size=(max(h // 48, 2), max(w // 48, 2))).astype(np.float32)
        blotch = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        return a + blotch[..., None]
    raise ValueError(f"unknown background {scene.background!r}")


def _shape_points(o: Obj) -> list[tuple[float, float]] | None:
    r = o.size / 2
    if o.shape == "triangle":
        return [(o.x, o.y - r), (o.x + r * 0.95, o.y + r * 0.8), (o.x - r * 0.95, o.y + r * 0.8)]
    if o.shape == "cross":
        t = r * 0.36  # half the bar width
        pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
        return [(o.x + dx, o.y + dy) for dx, dy in pts]
    return None


def draw_object(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    fill = COLOURS[o.colour]
    r = o.size / 2
    if o.shape == "circle":
        draw.ellipse((o.x - r, o.y - r, o.x + r, o.y + r), fill=fill)
    elif o.shape == "square":
        s = r * 0.88  # a square's corners reach further than a circle of the same size
        draw.rectangle((o.x - s, o.y - s, o.x + s, o.y + s), fill=fill)
    else:
        pts = _shape_points(o)
        if pts is None:
            raise ValueError(f"unknown shape {o.shape!r}")
        draw.polygon(pts, fill=fill)
    if o.glyph:
        _draw_glyph(draw, o)


def _draw_glyph(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    rows = FONT[o.glyph]
    cell = 0.6 * o.size / len(rows)  # the glyph is 60% of the object's height
    x0, y0 = o.x - 2.5 * cell, o.y - 3.5 * cell
    ink = (0, 0, 0) if o.colour in _DARK_INK else (255, 255, 255)
    for i, row in enumerate(rows):
        for j, bit in enumerate(row):
            if bit == "#":
                draw.rectangle(
                    (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1), fill=ink
                )


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``scene.width`` x ``scene.height`` pixels (a pure function of the scene)."""
    pixels = np.clip(np.rint(background(scene)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        draw_object(draw, o)
    return image
