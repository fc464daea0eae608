"""Built-in model names: ``--model tiny`` (and any later built-in) -> a checkpoint directory.

A built-in is a function that returns its checkpoint directory, making it on first use if it must; adding
one is one entry in ``BUILTINS``. Only the entry points (``pipeline``, ``bench``, the CLI) import this
module. It is where the loading path meets ``ptp_cli.builders``, and only when a built-in is asked for:
loading a checkpoint by path or hub id never imports the builders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ptp_cli import loading


def _tiny() -> Path:
    """The random-weight tiny model, built into $PTP_HOME/models on first use."""
    from ptp_cli.builders.tiny import ensure_tiny  # the writers load only when a built-in is asked for

    return ensure_tiny()


def _mini() -> Path:
    """ptp-mini, the trained miniature InternVL2 shipped as package data (ModelLoadError when not shipped)."""
    from ptp_cli.mini.shipped import shipped_checkpoint

    return shipped_checkpoint()


BUILTINS: dict[str, Callable[[], Path]] = {
    "tiny": _tiny,
    "mini": _mini,
}
RANDOM_WEIGHTS = frozenset({"tiny"})  # built-ins whose weights are random: their answers are noise


def resolve_builtin(name: str) -> Path | None:
    """The checkpoint directory of built-in model ``name``, or None when ``name`` is not a built-in."""
    make = BUILTINS.get(name)
    return make() if make is not None else None


def resolve_model(name_or_path: str, *, offline: bool | None = None) -> Path:
    """``ptp_cli.loading.resolve_model`` that also takes the built-in names (a built-in wins over a directory of
    the same name)."""
    path = resolve_builtin(str(name_or_path))
    return path if path is not None else loading.resolve_model(str(name_or_path), offline=offline)


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offline: bool | None = None,
) -> loading.LoadedModel:
    """``ptp_cli.loading.load_model`` that also takes the built-in names. ``cfg.name`` is what was asked for,
    e.g. ``"tiny"``."""
    path = resolve_model(name_or_path, offline=offline)
    return loading.load_model(str(path), dtype=dtype, device=device, offline=offline, name=str(name_or_path))
