"""Loading checkpoints: find one (``resolve``), read its config (``configs``), convert its weights
(``weights``), and build the model (``model``). Writing checkpoints lives in ``ptp_cli.builders``, which this
package never imports; built-in names (``tiny``) are ``ptp_cli.zoo``'s.

Finding a checkpoint and reading its config import no torch (``ptp infer --check`` does only that); the torch
side (``weights``, ``model``) loads on first use of one of its names.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ptp_cli.loading.configs import load_config
from ptp_cli.loading.files import Layout
from ptp_cli.loading.resolve import resolve_model

if TYPE_CHECKING:
    from ptp_cli.loading.model import LoadedModel, build_model, load_model
    from ptp_cli.loading.weights import canonical_shapes, load_state_dict

_TORCH_SIDE = {"LoadedModel": "model", "build_model": "model", "load_model": "model",
               "canonical_shapes": "weights", "load_state_dict": "weights"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        return getattr(import_module(f"ptp_cli.loading.{_TORCH_SIDE[name]}"), name)
    raise AttributeError(f"module 'ptp_cli.loading' has no attribute {name!r}")


__all__ = [
    "Layout",
    "LoadedModel",
    "build_model",
    "canonical_shapes",
    "load_config",
    "load_model",
    "load_state_dict",
    "resolve_model",
]
