"""What both training stages of ptp-mini share: the command line, the schedule, atomic checkpoints, the log."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def lr_at(peak: float, warmup: int, steps: int, step: int) -> float:
    """Linear warm-up to ``peak``, then cosine down to a tenth of it at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save, atomically: a kill mid-save keeps the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, config: Any, schedule_only: tuple[str, ...]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if there is none), refused when it was written with other settings
    than ``config`` (a dataclass); fields in ``schedule_only`` (when to save, probe, evaluate) may differ.
    A setting added to the code after the checkpoint was written counts as its default there: new options
    are off by default and leave old runs as they were, so those runs can still be resumed."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    defaults = asdict(type(config)())

    def results(c: dict) -> dict:
        c = {**defaults, **c}
        return {k: v for k, v in c.items() if k not in schedule_only}

    if results(state["config"]) != results(asdict(config)):
        raise ValueError(f"{path.parent} holds a run with other settings: {state['config']}")
    return state


def log(out: Path, record: dict) -> None:
    """Append one JSON line to ``out/train.log``."""
    with (out / "train.log").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def config_main(run, config_cls, argv: list[str] | None, *, prog: str, doc: str, out_help: str) -> None:
    """A stage's command line: ``--out`` plus one option per field of its config dataclass."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    for name, default in asdict(config_cls()).items():
        kind = _flag if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    print(run(out, config_cls(**args)))
