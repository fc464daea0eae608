"""The recipe of the shipped ptp-mini weights: every stage's command, in order, and one command that runs them.

    python -m training.recipe [--runs runs] [--print]

runs stage 1a (vision, token read-outs), stage 1b (vision, plus the place and CLS read-outs), stage 2 (the LLM)
and the shipping of the result into ``ptp_cli/mini/checkpoint/`` (what ``--model mini`` loads), each in its
own folder under ``--runs``. Every stage resumes: after a kill, the same command continues where it stopped.
``--print`` prints the commands instead. ``ptp_cli/mini/checkpoint/ptp_mini.json`` records the stage-2 settings
of the shipped run; a test keeps them equal to ``STAGES``.
"""

from __future__ import annotations

import argparse
import shlex
from importlib import import_module

STAGES: list[tuple[str, list[str]]] = [  # (module under training, its arguments; {runs}: the runs folder)
    ("pretrain", ["--out", "{runs}/vit", "--seed", "1", "--cls-weight", "0", "--place-weight", "0"]),
    ("pretrain", ["--out", "{runs}/vit-1b", "--seed", "1", "--steps", "3000", "--lr", "0.003", "--probe-every", "500",
                  "--init", "{runs}/vit/vision.pt"]),
    ("train", ["--out", "{runs}/mini", "--seed", "1", "--steps", "5000", "--single-tile-until", "0.25",
               "--small-grid-until", "0.6", "--init", "{runs}/vit-1b/vision.pt", "--count-view", "tiles",
               "--token-place-weight", "1", "--route-place-weight", "1", "--route-count-weight", "1",
               "--route-count-head", "2"]),
    ("ship", ["{runs}/mini"]),
]


def commands(runs: str = "runs") -> list[tuple[str, list[str]]]:
    """``STAGES`` with the runs folder filled in."""
    return [(module, [a.format(runs=runs) for a in args]) for module, args in STAGES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder of the stages' run folders (default: runs)")
    parser.add_argument("--print", action="store_true", dest="dry", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    for module, stage_args in commands(args.runs):
        print(f"python -m training.{module} {shlex.join(stage_args)}", flush=True)
        if not args.dry:
            import_module(f"training.{module}").main(stage_args)


if __name__ == "__main__":
    main()
