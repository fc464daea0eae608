"""What a run is configured with (``RunConfig``), checked as far as it can be without weights; no torch.

``read_model_config`` reads a checkpoint's config (not its weights) and checks the settings against it: what
``ptp infer --check`` and a run do first, before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ptp_cli.config import ModelConfig
from ptp_cli.errors import UsageError
from ptp_cli.loading import load_config
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.pruning import PruneConfig
from ptp_cli.pruning.catalog import METHODS
from ptp_cli.settings import check_fields, default
from ptp_cli.zoo import resolve_model

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is configured with; checked when built (no model needed), trusted after.

    Defaults and allowed values are declared in ``ptp_cli/settings.py``. Fields that change results are echoed
    in every row.
    """

    model: str = default("model")  # local dir, hub id (from the HF cache), "mini" or "tiny"
    engine: str = default("engine")  # ptp: ptp's own engine (every method); vllm: ptp prunes, vLLM generates
    vllm_memory: float = default("vllm_memory")  # engine vllm on a GPU: vLLM's fraction of the device's memory
    prune: PruneConfig = field(default_factory=PruneConfig)  # pruning method and its settings
    max_tiles: int | None = default("max_tiles")  # tile cap; None: the checkpoint's max_dynamic_patch
    min_tiles: int | None = default("min_tiles")  # fewest tiles; None: the checkpoint's
    max_new_tokens: int = default("max_new_tokens")
    temperature: float = default("temperature")  # 0: greedy
    seed: int = default("seed")  # sampling and random-pruning seed (per-record override possible)
    system_message: str | None = default("system_message")  # None: the checkpoint's / template's
    dtype: str = default("dtype")
    device: str = default("device")
    batch_size: int = default("batch_size")  # most requests per engine batch
    max_batch_tokens: int | None = default("max_batch_tokens")  # most padded prompt tokens per batch
    max_prompt_tokens: int | None = default("max_prompt_tokens")  # longest prompt (unpruned); None: the model's
    logprobs: bool = default("logprobs")  # add per-token ids and log-probabilities to each row
    kept: bool = default("kept")  # add the kept visual token indices to each row (to draw what PTP kept)
    max_pixels: int = default("max_pixels")  # decompression-bomb guard
    workers: int = default("workers")  # image loading / tiling threads
    max_errors: int | None = default("max_errors")  # failed records that stop the run (RunAborted); None: no cap

    def __post_init__(self) -> None:
        """The one check of every run setting (the pruning settings were checked when ``prune`` was built)."""
        check_fields("run", {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prune"})
        if self.min_tiles is not None and self.max_tiles is not None and self.min_tiles > self.max_tiles:
            raise UsageError(f"--min-tiles ({self.min_tiles}) is larger than --max-tiles ({self.max_tiles})")
        if self.prune.positions is None:  # the engine's positions: vLLM numbers prompt embeddings 0..n-1
            mode = "contiguous" if self.engine == "vllm" else "original"
            object.__setattr__(self, "prune", self.prune.with_positions(mode))

    def resolved_device(self) -> torch.device:
        from ptp_cli.run.devices import resolve_device  # torch: only what runs the model needs it

        return resolve_device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        from ptp_cli.run.devices import resolve_dtype

        return resolve_dtype(self.dtype, device)

    def tiling(self, model_cfg: ModelConfig) -> TilingOptions:
        """The checkpoint's tiling with --max-tiles / --min-tiles on top."""
        tiling = TilingOptions.from_config(model_cfg, max_tiles=self.max_tiles)
        try:
            return dataclasses.replace(tiling, min_tiles=self.min_tiles or tiling.min_tiles)
        except ValueError as e:  # e.g. --min-tiles above the checkpoint's cap
            raise UsageError(f"--min-tiles/--max-tiles: {e}") from None


def read_model_config(config: RunConfig, *, offline: bool | None = None) -> tuple[Path, ModelConfig]:
    """The checkpoint's folder and config, read without its weights, with every setting checked against it.

    Cheap next to loading the weights: a run calls it first, so a bad layer index fails before they load.
    ``offline``: as for ``resolve_model`` (True: only a local directory or the local hub cache).
    """
    model_dir = resolve_model(config.model, offline=offline)
    model_cfg = load_config(model_dir).with_name(config.model)
    check_against_model(config, model_cfg)
    return model_dir, model_cfg


def check_against_model(config: RunConfig, model_cfg: ModelConfig) -> None:
    """The checks that need the model's config: layer indices, tiling, the engine's methods."""
    config.prune.check_layers(model_cfg)
    config.tiling(model_cfg)
    if config.engine == "vllm" and METHODS[config.prune.method].capabilities.prunes_in_llm:
        raise UsageError(in_llm_with_vllm(config.prune.method))
    if config.engine == "vllm" and config.prune.positions == "original" and config.prune.method != "none":
        raise UsageError(original_positions_with_vllm())


def in_llm_with_vllm(method: str) -> str:
    """The one line that refuses an in-LLM method under --engine vllm (vLLM's layers keep every token)."""
    pre_llm = ", ".join(sorted(n for n, entry in METHODS.items() if not entry.capabilities.prunes_in_llm))
    return (f"--method {method} prunes inside the LLM, which only ptp's own engine runs: use --engine ptp "
            f"(vLLM serves the pre-LLM methods: {pre_llm})")


def original_positions_with_vllm() -> str:
    """The one line that refuses --positions original under --engine vllm (it numbers prompt embeddings 0..n-1)."""
    return ("--positions original needs explicit RoPE positions, which vLLM's prompt-embedding input cannot take: "
            "use --positions contiguous with --engine vllm, or --engine ptp")
