"""Re-run the first steps of a stage-2 run (training.train) with its recorded settings and compare the
training log line by line: a cheap check that the current code still reproduces a long run.

    python -m training.repro_check runs/mini --steps 300 [--set place_head=-1 ...]

Exit status 0 when every logged loss of the first ``--steps`` steps is equal (to the log's 4 decimals)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from training.train import STATE, TrainConfig, train

SKIP = ("elapsed",)  # wall-clock fields differ between runs by nature


def _steps(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if '"lm"' in line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting the run predates (its value then)")
    args = ap.parse_args(argv)
    saved = torch.load(args.run / STATE, weights_only=False)["config"]
    known = {f.name: f for f in fields(TrainConfig)}
    for item in args.set:
        name, value = item.split("=", 1)
        saved[name] = type(known[name].default)(value) if not isinstance(known[name].default, bool) \
            else value.lower() in ("1", "true", "yes")
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known} | {"eval_minutes": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        train(Path(tmp), cfg, stop_at=args.steps)
        again = _steps(Path(tmp) / "train.log")
    first = _steps(args.run / "train.log")[:len(again)]
    bad = [(a["step"], k) for a, b in zip(first, again, strict=True) for k in a if k not in SKIP and a[k] != b.get(k)]
    print(f"{len(again)} log lines compared ({args.steps} steps): {'equal' if not bad else f'{len(bad)} differ'}")
    for step, key in bad[:10]:
        print(f"  step {step}: {key}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
