"""The accuracy table of docs/accuracy.md ("Positions and the baselines") from ``ptp eval`` grid folders.

    python scripts/positions_table.py GOLD.jsonl OUT_DIR [--pairs "A:B;C:D"]

Reads every ``OUT_DIR/*.jsonl`` run (rows in the gold file's order), scores exact match (the synth answers are one
word: lower-cased and stripped), and prints one Markdown row per run: visual tokens kept / before (whole counts,
mean per sample), overall accuracy, retention (over ``none``), and per question type; then, for each pair
``A:B``, the paired difference A - B with its 95% bootstrap interval and McNemar's one-sided p (``eval/paired.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ptp_cli.eval.paired import paired


def _right(rows: list[dict], gold: list[dict]) -> list[bool]:
    by_line = {r.get("line"): r for r in rows}
    return [str(by_line.get(i + 1, {}).get("answer", "")).strip().lower().rstrip(".") == g["answer"].lower()
            for i, g in enumerate(gold)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gold", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--pairs", default="")
    args = ap.parse_args(argv)
    gold = [json.loads(line) for line in args.gold.read_text().splitlines() if line.strip()]
    types = sorted({g["type"] for g in gold})
    runs: dict[str, tuple[list[bool], float, float]] = {}
    for path in sorted(args.out_dir.glob("*.jsonl"), key=lambda p: (p.stem != "none", p.stem)):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) < len(gold):
            continue  # a run still going
        after = [r["tokens"]["visual_after"] for r in rows if "tokens" in r]
        before = [r["tokens"]["visual_before"] for r in rows if "tokens" in r]
        runs[path.stem] = (_right(rows, gold), sum(after) / len(after), sum(before) / len(before))
    base = sum(runs["none"][0]) / len(gold) if "none" in runs else None
    print(f"| run | visual tokens kept | overall | retention | {' | '.join(types)} |")
    print("|---|---|---|---|" + "---|" * len(types))
    for name, (right, after, before) in runs.items():
        acc = sum(right) / len(right)
        per = [sum(r for r, g in zip(right, gold, strict=True) if g["type"] == t) for t in types]
        counts = [sum(g["type"] == t for g in gold) for t in types]
        ret = f"{100 * acc / base:.1f}" if base else "-"
        cells = " | ".join(f"{100 * p / c:.0f}" for p, c in zip(per, counts, strict=True))
        print(f"| {name} | {after:.0f} / {before:.0f} | {100 * acc:.1f} | {ret} | {cells} |")
    for pair in filter(None, args.pairs.split(";")):
        a, b = pair.split(":")
        if a in runs and b in runs:
            p = paired(runs[a][0], runs[b][0])
            print(f"{a} - {b}: {100 * p.diff:+.1f} points (95% {100 * p.low:+.1f} to {100 * p.high:+.1f}; "
                  f"{p.a_only} vs {p.b_only} discordant, McNemar one-sided p = {p.p_greater:.2g})")


if __name__ == "__main__":
    main()
