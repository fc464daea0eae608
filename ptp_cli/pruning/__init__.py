"""Token pruning: the method interface, the user's settings, and every method (importing registers them)."""

from ptp_cli.pruning import baselines, inllm, ptp  # noqa: F401  (registration)
from ptp_cli.pruning.base import METHODS, PruningMethod
from ptp_cli.pruning.settings import PRESETS, PruneConfig, make_method

__all__ = ["METHODS", "PRESETS", "PruneConfig", "PruningMethod", "make_method"]
