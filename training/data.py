"""Training samples for ptp-mini: a synth scene tiled exactly as inference tiles it, a multi-turn prompt with
the answers as targets, and the scene's ground truth per visual token (for the vision auxiliary losses).

The prompt of the first turn is ``encode_prompt``'s, byte for byte the prompt ``ptp infer`` builds; further
questions about the same image follow as later turns of the same chat template (one ViT pass, several answers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ptp_cli.config import ModelConfig
from ptp_cli.preprocess.image import TilingOptions, find_grid
from ptp_cli.synth import Example, Question, Scene, render
from ptp_cli.synth.scene import COLOURS, GLYPHS, PLURALS, SHAPES, TILE, Obj
from ptp_cli.text.prompts import Template, encode_prompt
from ptp_cli.text.tokenization import Tokenizer

IGNORE = -100  # label of positions without a loss
TOKEN_GRID = 16  # visual tokens per tile side after pixel shuffle
TOKEN_PX = TILE // TOKEN_GRID  # 28 tile pixels per token
MIN_GLYPH_PX = 44  # an object smaller than this (tile pixels) has no legible glyph: its glyph is not a target
CLS_TARGETS = len(COLOURS) + len(SHAPES) + 1  # presence of each colour, each shape, any object


@dataclass
class Sample:
    pixel_values: torch.Tensor  # [T, 3, 448, 448] float32, normalised
    ids: torch.Tensor  # [S] prompt and answers, long
    labels: torch.Tensor  # [S] next-token targets (IGNORE except answer tokens and their separators)
    image_start: int  # index of the first <IMG_CONTEXT> in ids
    token_labels: torch.Tensor  # [T, 256, 4] per visual token: colour, shape, glyph (0 = none), is-centre
    cls_targets: torch.Tensor  # [T, CLS_TARGETS] float, what each tile contains
    has_object: torch.Tensor  # [T] bool, the tile shows part of an object
    types: list[str]  # the question types asked
    answer_rows: list[int]  # per question: the position whose next token is the answer's first
    naming_rows: list[list[int]]  # per question: the last token of each phrase naming an object ("red circle")
    named: list[list[int]]  # per naming row (flat, in order): visual tokens (0..T*256-1) of the objects it names
    named_one: list[tuple[int, int, int] | None]  # per naming row: (colour, shape, glyph) classes of the one
    # object it names (glyph IGNORE when it carries none); None when it names several or none
    named_place: list[tuple[float, float] | None]  # per naming row: that one object's centre, fractions of the
    # canvas width and height (None as above)
    named_count: list[int]  # per naming row: how many objects it names
    kept: torch.Tensor | None = None  # sorted visual token indices left in ``ids`` (None: all; ``drop_visual``)

    def visual_rows(self, index: list[int] | torch.Tensor) -> list[int]:
        """Sequence rows of the visual tokens ``index`` (0..T*256-1) that are in the sequence, in order."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if self.kept is None:
            return (self.image_start + index).tolist()
        rank = torch.searchsorted(self.kept, index).clamp(max=max(len(self.kept) - 1, 0))
        present = self.kept[rank] == index if len(self.kept) else torch.zeros_like(index, dtype=torch.bool)
        return (self.image_start + rank[present]).tolist()


def drop_visual(sample: Sample, kept: torch.Tensor) -> Sample:
    """``sample`` as pre-LLM pruning leaves it: only the visual tokens ``kept`` (indices into T*256) in the
    sequence, which renumbers every later token contiguously, as ptp's engine does. Per-token truth, the named
    objects' token lists and the pixels stay in the unpruned indices (``Sample.visual_rows`` maps them)."""
    kept = torch.as_tensor(kept, dtype=torch.long).unique()  # sorted
    n = sample.pixel_values.shape[0] * TOKEN_GRID**2
    start, dropped = sample.image_start, n - len(kept)
    rows = [*sample.answer_rows, *(r for rs in sample.naming_rows for r in rs)]
    if min(rows) < start + n:
        raise ValueError("a question row lies before the end of the image")

    def cut(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:start], t[start + kept], t[start + n:]])

    return dataclasses.replace(
        sample, ids=cut(sample.ids), labels=cut(sample.labels), kept=kept,
        answer_rows=[r - dropped for r in sample.answer_rows],
        naming_rows=[[r - dropped for r in rs] for rs in sample.naming_rows],
    )


def _body(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return ids[1:] if ids and ids[0] == tokenizer.bos_id else ids


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise ValueError("a question's tokens are not where the chat template put them")


def naming_phrases(q: Question) -> list[tuple[int, Callable[[Obj], bool]]]:
    """Where each phrase of ``q`` that names objects ends (a character offset into ``q.text``) and which objects
    it names: "What color is the [circle]?" names every circle; "Where is the [red circle] relative to the
    [blue square]?" names two objects."""
    t, target = q.text, q.target
    if q.type == "position":
        a, b = f"{target[0]} {target[1]}", f"{target[2]} {target[3]}"
        end_a = t.index(a) + len(a)
        return [(end_a, lambda o: o.kind == target[:2]), (t.index(b, end_a) + len(b), lambda o: o.kind == target[2:])]
    if q.type in ("color", "count"):
        phrase, which = (PLURALS[target[0]] if q.type == "count" else target[0]), lambda o: o.shape == target[0]
    elif q.type == "shape":
        phrase, which = target[0], lambda o: o.colour == target[0]
    else:  # text, exist
        phrase, which = f"{target[0]} {target[1]}", lambda o: o.kind == target
    return [(t.index(phrase) + len(phrase), which)]


def chat_ids(
    tokenizer: Tokenizer, template: Template, questions: list[Question], *, num_image_tokens: int,
    system_message: str | None,
) -> tuple[list[int], list[int], int, list[int], list[list[int]]]:
    """(ids, labels, image_start, answer rows, naming rows) of a conversation: the image and the first question,
    then one turn each; per question, the rows of the last token of each phrase that names objects."""
    first = encode_prompt(
        tokenizer, template, question=questions[0].text, num_image_tokens=num_image_tokens,
        system_message=system_message,
    )
    sep = tokenizer.token_to_id(template.sep_token)
    assert sep is not None
    ids, labels = list(first.ids), [IGNORE] * len(first.ids)
    rows, naming, cursor = [], [], first.image_start + num_image_tokens
    for i, q in enumerate(questions):
        if i:
            turn = _body(tokenizer, template.user_role + q.text + template.sep + template.assistant_role)
            ids += turn
            labels += [IGNORE] * len(turn)
        text = _body(tokenizer, q.text)
        begin = _find(ids, text, cursor)
        cursor = begin + len(text)
        prefixes = [_body(tokenizer, q.text[:end]) for end, _ in naming_phrases(q)]
        if any(text[:len(p)] != p for p in prefixes):  # a phrase's last token must be a token of the question
            raise ValueError(f"the tokenizer merges across a naming phrase's end in {q.text!r}")
        naming.append([begin + len(p) - 1 for p in prefixes])
        target = [*_body(tokenizer, q.answer), sep]
        labels[-1] = target[0]  # the last prompt token predicts the answer's first token
        rows.append(len(ids) - 1)
        ids += target
        labels += [*target[1:], IGNORE]
    return ids, labels, first.image_start, rows, naming


def _tile_frames(scene: Scene, n_tiles: int) -> list[tuple[float, float, float, float]]:
    """Per tile: (scale x, scale y, offset x, offset y) taking canvas pixels to that tile's pixels."""
    cols, rows = scene.grid
    fx, fy = cols * TILE / scene.width, rows * TILE / scene.height
    frames = [(fx, fy, c * TILE, r * TILE) for r in range(rows) for c in range(cols)]
    if n_tiles > len(frames):  # the thumbnail: the whole canvas squeezed into one tile
        frames.append((TILE / scene.width, TILE / scene.height, 0.0, 0.0))
    return frames


def token_truth(scene: Scene, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """[T, 256, 4] per-token labels, [T, CLS_TARGETS] per-tile presence, and each object's visual tokens
    (indices t*256 + i over every tile, thumbnail included), from the scene's geometry."""
    labels = torch.zeros(n_tiles, TOKEN_GRID, TOKEN_GRID, 4, dtype=torch.long)
    present = torch.zeros(n_tiles, CLS_TARGETS)
    where: list[list[int]] = [[] for _ in scene.objects]
    centres = (np.arange(TOKEN_GRID) + 0.5) * TOKEN_PX  # token centres along one side, tile px
    colours, shapes = list(COLOURS), list(SHAPES)
    for t, (fx, fy, ox, oy) in enumerate(_tile_frames(scene, n_tiles)):
        for n, o in enumerate(scene.objects):
            x, y, r = o.x * fx - ox, o.y * fy - oy, o.size * fx / 2
            if not (0 <= x < TILE and 0 <= y < TILE):
                continue
            dist = np.hypot(centres[None, :] - x, centres[:, None] - y)  # [16 rows, 16 cols]
            cover = torch.from_numpy(dist <= r)
            ci, cj = min(int(y // TOKEN_PX), TOKEN_GRID - 1), min(int(x // TOKEN_PX), TOKEN_GRID - 1)
            cover[ci, cj] = True
            glyph = GLYPHS.index(o.glyph) + 1 if o.glyph else 0
            if glyph and 2 * r < MIN_GLYPH_PX:
                glyph = -100  # too small to read here: no target either way
            labels[t][cover] = torch.tensor([colours.index(o.colour) + 1, shapes.index(o.shape) + 1, glyph, 0])
            labels[t, ci, cj, 3] = 1
            where[n] += (t * TOKEN_GRID * TOKEN_GRID + cover.flatten().nonzero()[:, 0]).tolist()
            present[t, colours.index(o.colour)] = 1
            present[t, len(colours) + shapes.index(o.shape)] = 1
            present[t, -1] = 1
    return labels.flatten(1, 2), present, where


def make_sample(
    ex: Example, extra: list[Question], *, tokenizer: Tokenizer, template: Template, cfg: ModelConfig,
    system_message: str | None = None,
) -> Sample:
    """Render, tile and tokenise one example with its extra questions (the order of turns is as given)."""
    tiling = TilingOptions.from_config(cfg)
    scene = ex.scene
    if find_grid(scene.width, scene.height, max_tiles=tiling.max_tiles) != scene.grid:
        raise ValueError(f"scene {ex.id} does not tile into its grid {scene.grid}")
    pixels = tiling.preprocess(render(scene))  # [T, 3, 448, 448]
    n_tiles = pixels.shape[0]
    questions = [ex.question, *extra]
    ids, labels, start, rows, naming = chat_ids(
        tokenizer, template, questions, num_image_tokens=n_tiles * cfg.tokens_per_tile,
        system_message=system_message,
    )
    token_labels, present, where = token_truth(scene, n_tiles)
    return Sample(
        pixel_values=pixels, ids=torch.tensor(ids), labels=torch.tensor(labels), image_start=start,
        token_labels=token_labels, cls_targets=present, has_object=present[:, -1] > 0,
        types=[q.type for q in questions], answer_rows=rows, naming_rows=naming,
        named=[
            sorted({i for n, o in enumerate(scene.objects) if names(o) for i in where[n]})
            for q in questions for _, names in naming_phrases(q)
        ],
        named_one=[_classes(scene, names) for q in questions for _, names in naming_phrases(q)],
        named_place=[_place(scene, names) for q in questions for _, names in naming_phrases(q)],
        named_count=[sum(map(names, scene.objects)) for q in questions for _, names in naming_phrases(q)],
    )


def _place(scene: Scene, names: Callable[[Obj], bool]) -> tuple[float, float] | None:
    """The centre of the one object ``names`` picks out, as fractions of the canvas (None: several or none)."""
    picked = [o for o in scene.objects if names(o)]
    return (picked[0].x / scene.width, picked[0].y / scene.height) if len(picked) == 1 else None


def _classes(scene: Scene, names: Callable[[Obj], bool]) -> tuple[int, int, int] | None:
    """(colour, shape, glyph) class indices of the one object ``names`` picks out (None: several or none)."""
    picked = [o for o in scene.objects if names(o)]
    if len(picked) != 1:
        return None
    o = picked[0]
    glyph = GLYPHS.index(o.glyph) if o.glyph else IGNORE
    return list(COLOURS).index(o.colour), SHAPES.index(o.shape), glyph
