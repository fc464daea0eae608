"""ptp: batch inference for InternVL2 with Pyramid Token Pruning.

The library API: ``from ptp_cli import Pipeline, RunConfig, PruneConfig, iter_records, open_input`` (see
docs/api.md; ``open_input`` reads Parquet, ``datasets`` folders, WebDataset shards and OpenAI batch files too).
The names load on first use, so ``import ptp_cli`` (and ``ptp --help``) stays free of torch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "ptp_cli.run.pipeline",
    "RunConfig": "ptp_cli.run_config",
    "PruneConfig": "ptp_cli.pruning",
    "iter_records": "ptp_cli.io.records",
    "open_input": "ptp_cli.io.formats",
}
__all__ = ["Pipeline", "PruneConfig", "RunConfig", "__version__", "iter_records", "open_input"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ptp_cli' has no attribute {name!r}")
