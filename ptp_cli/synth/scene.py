"""Synthetic high-resolution scenes and the questions asked about them, as plain data.

A scene is a canvas whose size tiles into an exact InternVL2 grid (1 to 12 tiles of 448 px, times a scale),
mostly background, with a few small objects: a shape in a colour, some carrying a digit or letter. Every
object lies wholly inside one tile (never across a tile seam). A question is built first (its type and
answer drawn uniformly), then a scene is constructed that answers it, so answers are balanced and the
question's words say nothing about its answer. ``answer`` recomputes any question's answer from the scene
alone (the oracle the tests check the constructor against).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptp_cli.preprocess.image import find_grid

TILE = 448  # InternVL2's tile side, in pixels

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 50, 185),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
GLYPHS = "0123456789AEHKX"  # what a "reading" question can ask for
GLYPH_SHAPES = ("circle", "square")  # shapes roomy enough to carry a glyph
COUNTS = ("0", "1", "2", "3", "4")
DIRECTIONS = ("left", "right", "above", "below")
TYPES = ("color", "shape", "text", "count", "exist", "position")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLOURS),
    "shape": SHAPES,
    "text": tuple(GLYPHS),
    "count": COUNTS,
    "exist": ("yes", "no"),
    "position": DIRECTIONS,
}
SUFFIX = " Answer the question using a single word or phrase."

# Grids (cols, rows) a canvas may tile into: every grid of 1..12 tiles with an aspect ratio within 1:3.
GRIDS = tuple(
    (c, r) for n in range(1, 13) for c in range(1, n + 1) for r in range(1, n + 1)
    if c * r == n and max(c, r) <= 3 * min(c, r)
)

# Object diameters in tile pixels (after tiling): plain objects, and roomier ones carrying a glyph.
PLAIN_SIZE = (36, 56)
GLYPH_SIZE = (60, 76)
MARGIN = 8  # tile pixels kept clear between an object and its tile's edge


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    colour: str  # a key of COLOURS
    glyph: str | None  # a character of GLYPHS drawn on it, or None
    x: float  # centre, canvas pixels
    y: float
    size: float  # diameter, canvas pixels

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    width: int  # canvas pixels
    height: int
    grid: tuple[int, int]  # (cols, rows) InternVL2's tiling picks for this canvas
    background: str  # "flat" | "gradient" | "texture"
    render_seed: int  # seeds the background's colours and texture
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class Question:
    type: str  # one of TYPES
    text: str  # what the model is asked
    answer: str  # the gold one-word answer, in ANSWERS[type]
    target: tuple[str, ...]  # what the question names: (shape,), (colour,), (colour, shape), (c1, s1, c2, s2)


# What each question type asks; {0}..{3} are the target's words, {plural} its shape's plural, {article}
# the indefinite article of the word after it.
QUESTIONS = {
    "color": "What color is the {0}?",
    "shape": "What shape is the {0} object?",
    "text": "What is written on the {0} {1}?",
    "count": "How many {plural} are there?",
    "exist": "Is there {article} {0} {1}?",
    "position": "Where is the {0} {1} relative to the {2} {3}?",
}


def question_text(qtype: str, target: tuple[str, ...]) -> str:
    if qtype not in QUESTIONS:
        raise ValueError(f"unknown question type {qtype!r}")
    article = "an" if target[0][:1] in "aeiou" else "a"  # by the next word's sound: every colour name is spelt as said
    return QUESTIONS[qtype].format(*target, plural=PLURALS.get(target[0], ""), article=article) + SUFFIX


def direction(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b``, when one axis clearly dominates (else None: ambiguous)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 2 * abs(dy) and abs(dx) > (a.size + b.size) / 2:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) > (a.size + b.size) / 2:
        return "above" if dy < 0 else "below"
    return None


def answer(scene: Scene, qtype: str, target: tuple[str, ...]) -> str | None:
    """The answer the scene gives to a question, or None when the question is ambiguous for it."""
    objs = scene.objects
    if qtype == "color":
        hits = [o for o in objs if o.shape == target[0]]
        return hits[0].colour if len(hits) == 1 else None
    if qtype == "shape":
        hits = [o for o in objs if o.colour == target[0]]
        return hits[0].shape if len(hits) == 1 else None
    if qtype == "text":
        hits = [o for o in objs if o.kind == target]
        return hits[0].glyph if len(hits) == 1 else None
    if qtype == "count":
        n = sum(o.shape == target[0] for o in objs)
        return str(n) if n <= int(COUNTS[-1]) else None
    if qtype == "exist":
        return "yes" if any(o.kind == target for o in objs) else "no"
    if qtype == "position":
        a = [o for o in objs if o.kind == target[:2]]
        b = [o for o in objs if o.kind == target[2:]]
        return direction(a[0], b[0]) if len(a) == 1 == len(b) and a[0] is not b[0] else None
    raise ValueError(f"unknown question type {qtype!r}")


# ---------------------------------------------------------------------------------------------------------
# Construction


class _Placer:
    """Drops objects at random free spots, each wholly inside one tile of the canvas's grid."""

    def __init__(self, rng: np.random.Generator, grid: tuple[int, int], scale: float) -> None:
        self.rng, self.grid, self.scale = rng, grid, scale
        self.objects: list[Obj] = []

    def spot(self, diameter: float) -> tuple[float, float]:
        """A centre (canvas px) inside a random tile; ``diameter`` in tile pixels."""
        cols, rows = self.grid
        col, row = int(self.rng.integers(cols)), int(self.rng.integers(rows))
        lo, hi = MARGIN + diameter / 2, TILE - MARGIN - diameter / 2
        x, y = self.rng.uniform(lo, hi, size=2)
        return (col * TILE + x) * self.scale, (row * TILE + y) * self.scale

    def free(self, x: float, y: float, size: float) -> bool:
        return all(np.hypot(o.x - x, o.y - y) > 0.75 * (o.size + size) + 6 for o in self.objects)

    def add(self, shape: str, colour: str, glyph: str | None, *, near: Obj | None = None, where: str = "") -> Obj:
        """Place an object; with ``near``, at the given ``where`` (a DIRECTION) of that object."""
        lo, hi = GLYPH_SIZE if glyph else PLAIN_SIZE
        for _ in range(500):
            d = float(self.rng.uniform(lo, hi))
            x, y = self.spot(d)
            obj = Obj(shape, colour, glyph, x, y, d * self.scale)
            if self.free(x, y, obj.size) and (near is None or direction(obj, near) == where):
                self.objects.append(obj)
                return obj
        raise _Retry


class _Retry(Exception):
    """A placement failed (a crowded or unlucky canvas): construct the scene again."""


def _pick(rng: np.random.Generator, items) -> str:
    return items[int(rng.integers(len(items)))]


def _glyph(rng: np.random.Generator, shape: str, p: float = 0.4) -> str | None:
    return _pick(rng, GLYPHS) if shape in GLYPH_SHAPES and rng.random() < p else None


def _distractors(place: _Placer, rng: np.random.Generator, n: int, allowed) -> None:
    """Add ``n`` random objects (shape, colour) for which ``allowed(colour, shape)`` holds."""
    added = 0
    for _ in range(200):
        if added == n:
            return
        shape, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
        if allowed(colour, shape):
            place.add(shape, colour, _glyph(rng, shape))
            added += 1
    raise _Retry


def _construct(place: _Placer, rng: np.random.Generator, qtype: str, ans: str, extra: int) -> tuple[str, ...]:
    """Place the objects a question of ``qtype`` answered ``ans`` needs, plus ``extra`` distractors."""
    colours = tuple(COLOURS)
    if qtype == "color":
        shape = _pick(rng, SHAPES)
        place.add(shape, ans, _glyph(rng, shape))
        _distractors(place, rng, extra, lambda c, s: s != shape)
        return (shape,)
    if qtype == "shape":
        colour = _pick(rng, colours)
        place.add(ans, colour, _glyph(rng, ans))
        _distractors(place, rng, extra, lambda c, s: c != colour)
        return (colour,)
    if qtype == "text":
        kind = (_pick(rng, colours), _pick(rng, GLYPH_SHAPES))
        place.add(kind[1], kind[0], ans)
        _distractors(place, rng, extra, lambda c, s: (c, s) != kind)
        return kind
    if qtype == "count":
        shape = _pick(rng, SHAPES)
        for _ in range(int(ans)):
            colour = _pick(rng, colours)
            place.add(shape, colour, _glyph(rng, shape))
        _distractors(place, rng, max(extra - int(ans) // 2, 1), lambda c, s: s != shape)
        return (shape,)
    if qtype == "exist":
        kind = (_pick(rng, colours), _pick(rng, SHAPES))
        if ans == "yes":
            place.add(kind[1], kind[0], _glyph(rng, kind[1]))
        else:  # near misses: the colour on another shape, the shape in another colour
            _distractors(place, rng, 1, lambda c, s: c == kind[0] and s != kind[1])
            _distractors(place, rng, 1, lambda c, s: s == kind[1] and c != kind[0])
        _distractors(place, rng, extra, lambda c, s: (c, s) != kind)
        return kind
    if qtype == "position":
        b = (_pick(rng, colours), _pick(rng, SHAPES))
        a = b
        while a == b:
            a = (_pick(rng, colours), _pick(rng, SHAPES))
        ref = place.add(b[1], b[0], _glyph(rng, b[1]))
        place.add(a[1], a[0], _glyph(rng, a[1]), near=ref, where=ans)
        _distractors(place, rng, extra, lambda c, s: (c, s) not in (a, b))
        return (*a, *b)
    raise ValueError(f"unknown question type {qtype!r}")


def make_example(
    rng: np.random.Generator, *, qtype: str, min_tiles: int = 1, max_tiles: int = 12
) -> tuple[Scene, Question]:
    """A scene built to answer one question of ``qtype``, its answer drawn uniformly from ANSWERS[qtype]."""
    grids = [g for g in GRIDS if min_tiles <= g[0] * g[1] <= max_tiles]
    if not grids:
        raise ValueError(f"no tile grid has between {min_tiles} and {max_tiles} tiles")
    ans = _pick(rng, ANSWERS[qtype])
    while True:
        grid = grids[int(rng.integers(len(grids)))]
        scale = float(rng.uniform(0.8, 1.25))
        width, height = round(grid[0] * TILE * scale), round(grid[1] * TILE * scale)
        # The grid InternVL2 picks under these limits and under its defaults (1..12): e.g. a large 2x2 canvas
        # would be cut 3x3 with up to 12 tiles.
        if {find_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles), find_grid(width, height)} != {grid}:
            continue
        place = _Placer(rng, grid, scale)
        extra = int(rng.integers(1, 5))
        try:
            target = _construct(place, rng, qtype, ans, extra)
        except _Retry:
            continue
        order = rng.permutation(len(place.objects))  # drawing order says nothing about roles
        scene = Scene(
            width=width,
            height=height,
            grid=grid,
            background=_pick(rng, ("flat", "gradient", "texture")),
            render_seed=int(rng.integers(2**31)),
            objects=tuple(place.objects[i] for i in order),
        )
        got = answer(scene, qtype, target)
        if got != ans:  # cannot happen by construction; the oracle has the last word
            raise AssertionError(f"constructed a {qtype} scene answering {got!r}, wanted {ans!r}")
        return scene, Question(type=qtype, text=question_text(qtype, target), answer=ans, target=target)


def more_questions(scene: Scene, rng: np.random.Generator, n: int) -> list[Question]:
    """Up to ``n`` further questions the scene answers unambiguously (training: one ViT pass, several answers).

    Types take turns (in a random order), so each type gets its share whatever the scene holds most of.
    """
    objs = scene.objects
    kinds = sorted({o.kind for o in objs})
    pool: dict[str, list[tuple[str, ...]]] = {
        "color": [(s,) for s in SHAPES],
        "shape": [(c,) for c in COLOURS],
        "text": [o.kind for o in objs if o.glyph],
        "count": [(s,) for s in SHAPES],
        "exist": [*kinds, *((_pick(rng, tuple(COLOURS)), _pick(rng, SHAPES)) for _ in kinds)],
        "position": [(*a, *b) for a in kinds for b in kinds if a != b],
    }
    answerable: dict[str, list[Question]] = {}
    for qtype, targets in pool.items():
        for i in rng.permutation(len(targets)):
            got = answer(scene, qtype, targets[int(i)])
            if got is not None:
                text = question_text(qtype, targets[int(i)])
                answerable.setdefault(qtype, []).append(Question(qtype, text, got, targets[int(i)]))
    out: list[Question] = []
    order = [TYPES[int(i)] for i in rng.permutation(len(TYPES))]
    while len(out) < n and any(answerable.values()):
        for qtype in order:
            if answerable.get(qtype) and len(out) < n:
                out.append(answerable[qtype].pop(0))
    return out
