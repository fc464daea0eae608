"""Built-in model names: ``--model tiny``, ``--model mini`` (and any later built-in) -> a checkpoint directory.

Two kinds: a model shipped as package data (``SHIPPED``, by its folder: this module imports no model package),
and a model made on first use (``_tiny``: built into ``$PTP_HOME/models`` by ``ptp_cli.builders``, imported
only when the folder is missing). Only the entry points (``pipeline``, ``bench``, the CLI) import this module:
loading a checkpoint by path or hub id never imports the builders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ptp_cli import loading
from ptp_cli.errors import ModelLoadError
from ptp_cli.home import TINY_VERSION, models_dir

if TYPE_CHECKING:
    import torch

# Built-in models shipped as package data (pyproject.toml's package-data): name -> checkpoint folder.
SHIPPED: dict[str, Path] = {
    "mini": Path(__file__).resolve().parent / "mini" / "checkpoint",  # ptp-mini, trained by training/ (repository)
}


def _shipped(name: str) -> Path:
    """A shipped model's folder; ModelLoadError when this build carries no weights for it."""
    folder = SHIPPED[name]
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"this build of ptp ships no {name} weights ({folder} is empty); train them as training/README.md "
            f"says (in ptp's repository) and install them with `python -m training.ship RUN_DIR`"
        )
    return folder


def _tiny() -> Path:
    """The random-weight tiny model, built into $PTP_HOME/models on first use."""
    built = models_dir() / TINY_VERSION
    if (built / "config.json").is_file():  # built before: the builders (and torch) stay unloaded
        return built
    from ptp_cli.builders.tiny import ensure_tiny  # the writers load only when the model must be made

    return ensure_tiny()


BUILTINS: dict[str, Callable[[], Path]] = {
    "tiny": _tiny,
    "mini": lambda: _shipped("mini"),
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
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    offline: bool | None = None,
) -> loading.LoadedModel:
    """``ptp_cli.loading.load_model`` that also takes the built-in names. ``cfg.name`` is what was asked for,
    e.g. ``"tiny"``. ``dtype``: None is float32."""
    path = resolve_model(name_or_path, offline=offline)
    options = {} if dtype is None else {"dtype": dtype}
    return loading.load_model(str(path), device=device, offline=offline, name=str(name_or_path), **options)
