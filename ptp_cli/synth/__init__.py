"""A synthetic high-resolution VQA benchmark where each answer lives in a small region of a large canvas.

``example(seed, index)`` is the ``index``-th question of the benchmark drawn with ``seed`` (independent of
every other index, so any slice can be regenerated alone); ``write_benchmark`` writes N of them as PNG images
plus ``questions.jsonl`` (id, image, question, answer, type), the input of ``ptp infer``/``ptp eval``.
Question types cycle through ``TYPES`` so each has the same share; answers are uniform within a type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptp_cli.synth.render import render
from ptp_cli.synth.scene import ANSWERS, GRIDS, TYPES, Question, Scene, answer, make_example, more_questions

__all__ = [
    "ANSWERS", "GRIDS", "TYPES", "Example", "Question", "Scene", "answer", "example", "more_questions", "render",
    "write_benchmark",
]


@dataclass(frozen=True)
class Example:
    id: str  # "{seed}-{index}"
    scene: Scene
    question: Question


def example(seed: int, index: int, *, min_tiles: int = 1, max_tiles: int = 12) -> Example:
    """The ``index``-th example of the benchmark with ``seed``: the same arguments give the same example."""
    if index < 0 or seed < 0:
        raise ValueError("seed and index must be >= 0")
    rng = np.random.default_rng([seed, index])
    qtype = TYPES[index % len(TYPES)]
    scene, question = make_example(rng, qtype=qtype, min_tiles=min_tiles, max_tiles=max_tiles)
    return Example(id=f"{seed}-{index}", scene=scene, question=question)


def write_benchmark(
    out_dir: Path, *, n: int, seed: int, min_tiles: int = 1, max_tiles: int = 12, start: int = 0
) -> Path:
    """Write examples ``start .. start+n-1`` to ``out_dir``: ``images/<id>.png`` and ``questions.jsonl``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "questions.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for index in range(start, start + n):
            ex = example(seed, index, min_tiles=min_tiles, max_tiles=max_tiles)
            image = f"images/{ex.id}.png"
            render(ex.scene).save(out_dir / image, optimize=False, compress_level=6)
            row = {
                "id": ex.id, "image": image, "question": ex.question.text,
                "answer": ex.question.answer, "type": ex.question.type,
            }
            f.write(json.dumps(row) + "\n")
    return path
