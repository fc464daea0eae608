"""ptp's cache folder (``$PTP_HOME``) and where the built-in models made on first use live in it.

Imports nothing heavy: ``ptp_cli.zoo`` finds a model built before without loading the builders (or torch).
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_VERSION = "tiny-v3"  # the tiny model's folder; bump when ptp_cli.builders.tiny changes its weights or files


def ptp_home() -> Path:
    """ptp's cache root: $PTP_HOME, default ~/.cache/ptp."""
    return Path(os.environ.get("PTP_HOME") or "~/.cache/ptp").expanduser()


def models_dir() -> Path:
    """Where built-in models are built: ``$PTP_HOME/models``."""
    return ptp_home() / "models"
