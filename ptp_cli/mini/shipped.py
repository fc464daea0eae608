"""Where the shipped ptp-mini checkpoint lives inside the package (``--model mini``); imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

from ptp_cli.errors import ModelLoadError

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoint"  # package data: config.json, safetensors, tokenizer
TRAIN_COMMAND = "`python -m ptp_cli.mini.pretrain` then `python -m ptp_cli.mini.train` (commands in docs/accuracy.md)"


def shipped_checkpoint() -> Path:
    """The shipped checkpoint's folder; ModelLoadError when this build carries no trained weights."""
    if not (SHIPPED_DIR / "config.json").is_file():
        raise ModelLoadError(
            f"this build of ptp ships no ptp-mini weights ({SHIPPED_DIR} is empty); train them with "
            f"{TRAIN_COMMAND} and install them with `python -m ptp_cli.mini.ship runs/mini`"
        )
    return SHIPPED_DIR
