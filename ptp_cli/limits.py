"""The allowed range of every numeric or enumerated setting, checkable without torch, weights or a model config.

``RunConfig.validate`` and ``PruneConfig.check`` apply this table to their fields; the CLI applies it to the
values a user gave before it imports torch, so ``--ratio 1.5`` fails in a fraction of a second. Rules that
need the model's depth stay with the dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ptp_cli.config import MAX_TILES
from ptp_cli.errors import UsageError
from ptp_cli.pruning.catalog import METHODS, POSITION_MODES, PRESETS

AGGREGATIONS = ("mean", "max")  # reductions over attention heads / instruction tokens
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
METHOD_NAMES = tuple(sorted(METHODS))  # from the torch-free registry: a typo fails before torch loads
PRESET_NAMES = tuple(PRESETS)
ENGINE_NAMES = ("ptp", "vllm")  # ptp's own engine; vLLM generating from ptp's pruned embeddings
AUTO = "auto"  # the one word a number setting may take instead of a number: alpha chosen per sample


@dataclass(frozen=True)
class Limit:
    """One setting's rule: a predicate on its value and how to say it."""

    ok: Callable[[Any], bool]  # True when the value is allowed
    rule: str  # completes "--name ...", e.g. "must be in [0, 1)"


def _optional(limit: Limit) -> Limit:
    return Limit(lambda v: v is None or limit.ok(v), limit.rule)


def _or_auto(limit: Limit) -> Limit:
    """``limit`` for a number, or the word ``auto``; any other string fails (rather than raising TypeError)."""
    return Limit(lambda v: v == AUTO or (not isinstance(v, str) and limit.ok(v)), f"{limit.rule} or {AUTO}")


_AT_LEAST_1 = Limit(lambda v: v >= 1, "must be at least 1")
_TILES = _optional(Limit(lambda v: 1 <= v <= MAX_TILES, f"must be in 1..{MAX_TILES}"))

LIMITS: dict[str, Limit] = {
    # pruning (PruneConfig fields, and the preset they start from)
    "method": Limit(lambda v: v in METHOD_NAMES, f"must be one of {', '.join(METHOD_NAMES)}"),
    "preset": Limit(lambda v: v in PRESET_NAMES, f"must be one of {', '.join(PRESET_NAMES)}"),
    "ratio": Limit(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "alpha": _or_auto(Limit(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")),
    "tau": Limit(lambda v: v > 0, "must be > 0"),
    "head_agg": Limit(lambda v: v in AGGREGATIONS, f"must be one of {', '.join(AGGREGATIONS)}"),
    "instr_agg": Limit(lambda v: v in AGGREGATIONS, f"must be one of {', '.join(AGGREGATIONS)}"),
    "pdrop_keep": Limit(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "positions": Limit(lambda v: v in POSITION_MODES, f"must be one of {', '.join(POSITION_MODES)}"),
    "vit_layer": Limit(lambda v: v >= 0, "must be >= 0"),
    "llm_layer": Limit(lambda v: v >= 0, "must be >= 0"),
    # run (RunConfig fields)
    "dtype": Limit(lambda v: v in DTYPE_NAMES, f"must be one of {', '.join(DTYPE_NAMES)}"),
    "engine": Limit(lambda v: v in ENGINE_NAMES, f"must be one of {', '.join(ENGINE_NAMES)}"),
    "max_new_tokens": _AT_LEAST_1,
    "temperature": Limit(lambda v: v >= 0, "must be >= 0"),
    "batch_size": _AT_LEAST_1,
    "max_batch_tokens": _optional(_AT_LEAST_1),
    "max_prompt_tokens": _optional(_AT_LEAST_1),
    "max_tiles": _TILES,
    "min_tiles": _TILES,
    "workers": _AT_LEAST_1,
    "max_pixels": _AT_LEAST_1,
    "max_errors": _optional(_AT_LEAST_1),
}


def check_values(values: Mapping[str, Any]) -> None:
    """Raise ``UsageError`` naming the first value outside its limit (names without a limit pass)."""
    for name, value in values.items():
        limit = LIMITS.get(name)
        if limit is not None and not limit.ok(value):
            raise UsageError(f"--{name.replace('_', '-')} {limit.rule}, got {value!r}")
