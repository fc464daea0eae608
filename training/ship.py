"""Turn a training run into the shipped checkpoint: ``python -m training.ship RUN_DIR [--to DIR]``.

Loads the run's last training state, writes the model (not the auxiliary heads) in the original InternVL2
layout to the package's checkpoint folder, with a ``ptp_mini.json`` saying how it was trained.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from training.train import STATE
from training.weights import export, new_model

# The repository's package-data folder (what `--model mini` loads once installed), not an installed copy's.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "ptp_cli" / "mini" / "checkpoint"


def ship(run_dir: Path, to: Path = SHIPPED_DIR) -> Path:
    """Export ``run_dir``'s training state to ``to`` (replacing what is there)."""
    run_dir, to = Path(run_dir), Path(to)
    state = torch.load(run_dir / STATE, weights_only=True)
    tok_dir = run_dir / "tokenizer"
    model = new_model(tok_dir, seed=0, vit_width=state["config"].get("vit_width", 32))  # init overwritten below
    model.load_state_dict(state["model"])
    if to.exists():
        shutil.rmtree(to)
    export(model, tok_dir, to)
    provenance = {
        "trained_by": "python -m training.recipe (training/README.md): training.pretrain (stages 1a, 1b), "
                      "training.train (stage 2, these settings)",
        "config": state["config"],
        "step": state["step"],
        "train_seconds": round(state["elapsed"]),
    }
    (to / "ptp_mini.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return to


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.ship", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the --out folder of a training run")
    parser.add_argument("--to", type=Path, default=SHIPPED_DIR, help="where to write the checkpoint")
    args = parser.parse_args(argv)
    print(ship(args.run_dir, args.to))


if __name__ == "__main__":
    main()
