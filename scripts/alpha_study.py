"""The evidence behind ``--alpha auto``: fixed alphas against per-sample rules, per question type.

    ptp eval GOLD --model mini --methods none --ratios 0.75,0.9 --alphas 0,0.25,0.5,0.75,1,auto --out-dir RUNS
    python scripts/alpha_study.py GOLD RUNS [--ratios 0.75,0.9] [--fit]

Reads the prediction files of those runs (``ptp@R,alpha=A.jsonl``; rows of PTP runs carry the signals
``c_concentration`` and ``s_concentration`` under ``pruning``) and prints, per ratio: exact-match accuracy per
question type for each fixed alpha (and for ``auto`` when it ran), the signals per type, and the best fixed
alpha per type (an oracle that knows the type). With ``--fit`` (on a calibration split, never the held-out
one) it also searches the rules that pick one of the measured alphas per sample from the signals' share
c / (c + s) with one threshold, replaying each sample's answer from the run with that alpha, and prints the
best. Replays are exact: a rule that outputs a measured alpha changes nothing else.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import fmean

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def correct(rows: list[dict], gold: dict[str, dict]) -> dict[str, int]:
    """id -> 1 if the row's answer matches the gold answer (an error row scores 0)."""
    return {str(r["id"]): int("answer" in r and normalise(r["answer"]) == normalise(gold[str(r["id"])]["answer"]))
            for r in rows}


def by_type(ok: dict[str, int], gold: dict[str, dict]) -> dict[str, float]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in ok.items():
        groups[gold[i]["type"]].append(v)
        groups["all"].append(v)
    return {t: fmean(v) for t, v in sorted(groups.items())}


def share(sig: dict[str, float]) -> float:
    c, s = sig.get("c_concentration", 0.0), sig.get("s_concentration", 0.0)
    return 0.5 if c + s <= 0 else c / (c + s)


def fit(per_ratio: list[tuple[dict[float, dict[str, int]], dict[str, float]]]) -> tuple[float, tuple[float, float, float]]:
    """Best (accuracy averaged over the ratios, (threshold, alpha below, alpha at or above)) of the rules
    "alpha = hi if share >= t else lo", one rule for every ratio; per ratio: (runs by alpha, share by id)."""
    cuts = sorted({v for _, signal in per_ratio for v in signal.values()})
    best = (-1.0, (0.0, 0.5, 0.5))
    for t in cuts[:: max(1, len(cuts) // 200)]:
        for lo in ALPHAS:
            for hi in ALPHAS:
                acc = fmean(fmean(runs[hi if signal[i] >= t else lo][i] for i in signal) for runs, signal in per_ratio)
                if acc > best[0]:
                    best = (acc, (t, lo, hi))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gold", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--ratios", default="0.75,0.9")
    parser.add_argument("--fit", action="store_true", help="search the threshold rules (calibration split only)")
    args = parser.parse_args()
    gold = {str(r["id"]): r for r in load(args.gold)}
    per_ratio = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        runs = {a: correct(load(args.runs / f"ptp@{ratio:g},alpha={a:g}.jsonl"), gold) for a in ALPHAS}
        auto_path = args.runs / f"ptp@{ratio:g},alpha=auto.jsonl"
        table = {f"alpha {a:g}": by_type(ok, gold) for a, ok in runs.items()}
        if auto_path.is_file():
            auto_rows = load(auto_path)
            table["auto"] = by_type(correct(auto_rows, gold), gold)
            used = [r["pruning"]["alpha"] for r in auto_rows if "pruning" in r]
            print(f"ratio {ratio:g}: auto used alpha mean {fmean(used):.3f}, min {min(used):.3f}, max {max(used):.3f}")
        types = list(next(iter(table.values())))
        print(f"\n### ratio {ratio:g}: exact-match accuracy (%)\n")
        print("| run | " + " | ".join(types) + " |\n|---|" + "---|" * len(types))
        for name, accs in table.items():
            print(f"| {name} | " + " | ".join(f"{100 * accs[t]:.1f}" for t in types) + " |")
        oracle = {t: max(table[f"alpha {a:g}"][t] for a in ALPHAS) for t in types}
        print("| best fixed alpha per type | " + " | ".join(f"{100 * oracle[t]:.1f}" for t in types) + " |")
        mid = {str(r["id"]): r.get("pruning", {}) for r in load(args.runs / f"ptp@{ratio:g},alpha=0.5.jsonl")}
        print("\n| type | c concentration | s concentration | share c/(c+s) |\n|---|---|---|---|")
        per: dict[str, list[dict]] = defaultdict(list)
        for i, sig in mid.items():
            per[gold[i]["type"]].append(sig)
        for t, sigs in sorted(per.items()):
            c = fmean(s.get("c_concentration", 0.0) for s in sigs)
            s_ = fmean(s.get("s_concentration", 0.0) for s in sigs)
            print(f"| {t} | {c:.4f} | {s_:.4f} | {fmean(share(s) for s in sigs):.3f} |")
        per_ratio.append((runs, {i: share(sig) for i, sig in mid.items()}))
    if args.fit:
        acc, (t, lo, hi) = fit(per_ratio)
        print(f"\nbest one-threshold rule over the ratios: alpha = {hi:g} if c/(c+s) >= {t:.4f} else {lo:g}: "
              f"{100 * acc:.1f}% (mean over the ratios)")


if __name__ == "__main__":
    main()
