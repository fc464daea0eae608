"""What both training stages of ptp-mini share: the command line, the schedule, atomic checkpoints, the log."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
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


_FIELD = re.compile(r"^    (\w+): [^#]+#\s*(.*)$")  # `    name: type = default  # help`
_MORE = re.compile(r"^    #\s*(.*)$")  # a comment line under it continues the help


def field_help(config_cls: type) -> dict[str, str]:
    """Each field's help: its comment in the dataclass's source, continuation lines included. A config's
    settings are documented once, where they are declared, and the command line reads them from there."""
    helps: dict[str, str] = {}
    name = None
    for line in inspect.getsource(config_cls).splitlines():
        if m := _FIELD.match(line):
            name = m.group(1)
            helps[name] = m.group(2)
        elif name is not None and (m := _MORE.match(line)):
            helps[name] += " " + m.group(1)
        else:
            name = None
    return helps


def config_parser(config_cls: type, *, prog: str, doc: str, out_help: str) -> argparse.ArgumentParser:
    """A stage's command line: ``--out`` plus one option per field of its config dataclass, each with the
    field's comment as help (ValueError for a field without one)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS, help=out_help)
    helps = field_help(config_cls)
    for name, default in asdict(config_cls()).items():
        if not helps.get(name):
            raise ValueError(f"{config_cls.__name__}.{name} has no comment to serve as its --help")
        kind = _flag if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=helps[name],
                            metavar="true|false" if kind is _flag else None)
    return parser


def parse_config(config_cls: type, argv: list[str] | None, **parser_options: str) -> tuple[Path, Any]:
    """(--out, the config) from a stage's command line (``parser_options``: as ``config_parser``)."""
    args = vars(config_parser(config_cls, **parser_options).parse_args(argv))
    out = args.pop("out")
    return out, config_cls(**args)


def config_main(run, config_cls, argv: list[str] | None, **parser_options: str) -> None:
    """Run a stage from its command line and print what it wrote."""
    out, cfg = parse_config(config_cls, argv, **parser_options)
    print(run(out, cfg))
