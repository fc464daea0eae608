"""Held-out accuracy of a checkpoint on a synth split, through the public inference pipeline.

A stop-gap scorer (normalised exact match, per type) for training-time monitoring; the benchmark's reported
numbers come from ``ptp eval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.synth import write_benchmark

EVAL_SEED = 1000  # the held-out split's seed; training refuses it and every seed above


def normalise(text: str) -> str:
    """Lower case, no surrounding whitespace or final full stop."""
    return text.strip().lower().rstrip(".").strip()


def heldout_split(folder: Path, *, n: int, seed: int = EVAL_SEED, max_tiles: int = 12) -> Path:
    """``folder/questions.jsonl`` of the first ``n`` held-out examples (written once, reused)."""
    path = folder / "questions.jsonl"
    if path.is_file() and sum(1 for _ in path.open(encoding="utf-8")) == n:
        return path
    return write_benchmark(folder, n=n, seed=seed, max_tiles=max_tiles)


def score(rows: list[dict[str, Any]], gold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy overall and per type; a failed row counts as wrong."""
    per_type: dict[str, list[int]] = {}
    for row in rows:
        g = gold[str(row["id"])]
        ok = int("answer" in row and normalise(row["answer"]) == normalise(g["answer"]))
        per_type.setdefault(g["type"], []).append(ok)
    every = [x for xs in per_type.values() for x in xs]
    return {
        "accuracy": round(sum(every) / max(len(every), 1), 4),
        "n": len(every),
        "per_type": {t: round(sum(xs) / len(xs), 4) for t, xs in sorted(per_type.items())},
    }


def evaluate(
    checkpoint: Path | str, folder: Path, *, n: int, method: str = "none", ratio: float = 0.5,
    seed: int = EVAL_SEED, max_tiles: int = 12,
) -> dict[str, Any]:
    """Accuracy of ``checkpoint`` (a folder or a built-in name) on the first ``n`` questions of the split with
    ``seed`` (written into ``folder`` once), with one pruning setting."""
    path = heldout_split(Path(folder), n=n, seed=seed, max_tiles=max_tiles)
    gold = {str(r["id"]): r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    config = RunConfig(
        model=str(checkpoint), prune=PruneConfig(method=method, ratio=ratio), max_new_tokens=4, batch_size=4,
        workers=1,
    )
    rows = list(Pipeline.load(config).infer(iter_records(path)))
    return score(rows, gold)
