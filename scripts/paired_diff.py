"""Paired accuracy difference between two runs on the same gold records, with a bootstrap 95% interval.

    python scripts/paired_diff.py GOLD A.jsonl B.jsonl [--by type] [--resamples 2000] [--seed 0]

Exact match after normalisation (lower case, no final full stop), an error row or a missing row scores 0.
The interval resamples the records (both runs together), so it reflects which questions were asked, not
the two runs' separate noise; a difference whose interval excludes 0 is unlikely to come from the draw of
questions alone.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path
from statistics import fmean


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def scores(path: Path, gold: dict[str, dict]) -> dict[str, int]:
    rows = {str(r["id"]): r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r}
    return {i: int("answer" in rows.get(i, {}) and normalise(rows[i]["answer"]) == normalise(g["answer"]))
            for i, g in gold.items()}


def interval(a: dict[str, int], b: dict[str, int], ids: list[str], *, resamples: int, rng: random.Random
             ) -> tuple[float, float, float]:
    """(mean of b - a, 2.5th and 97.5th percentile of the bootstrap means), in points."""
    diffs = [b[i] - a[i] for i in ids]
    boot = sorted(fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return 100 * fmean(diffs), 100 * boot[int(0.025 * resamples)], 100 * boot[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gold", type=Path)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--by", default=None)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gold = {str(r["id"]): r for r in map(json.loads, args.gold.read_text(encoding="utf-8").splitlines()) if r}
    a, b = scores(args.a, gold), scores(args.b, gold)
    groups: dict[str, list[str]] = defaultdict(list)
    for i, g in gold.items():
        groups["all"].append(i)
        if args.by:
            groups[str(g.get(args.by))].append(i)
    rng = random.Random(args.seed)
    print(f"{args.b.stem} - {args.a.stem} (points, 95% paired bootstrap interval)")
    for name, ids in groups.items():
        mean, lo, hi = interval(a, b, ids, resamples=args.resamples, rng=rng)
        print(f"{name}: {mean:+.1f} [{lo:+.1f}, {hi:+.1f}] (n={len(ids)})")


if __name__ == "__main__":
    main()
