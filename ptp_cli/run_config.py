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
from ptp_cli.image import DEFAULT_MAX_PIXELS, TilingOptions
from ptp_cli.limits import check_values
from ptp_cli.loading import load_config
from ptp_cli.pruning import PruneConfig
from ptp_cli.pruning.catalog import METHODS
from ptp_cli.zoo import resolve_model

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is configured with. Fields that change results are echoed in every row."""

    model: str = "OpenGVLab/InternVL2-2B"  # local dir, hub id (from the HF cache), or "tiny"
    engine: str = "ptp"  # ptp: ptp's own engine (every method); vllm: ptp prunes, vLLM generates (pre-LLM methods)
    prune: PruneConfig = field(default_factory=PruneConfig)  # pruning method and its settings
    max_tiles: int | None = None  # tile cap; None: the checkpoint's max_dynamic_patch
    min_tiles: int | None = None  # fewest tiles; None: the checkpoint's
    max_new_tokens: int = 64  # generation length cap
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # sampling and random-pruning seed (per-record override possible)
    system_message: str | None = None  # None: the checkpoint's / template's (a -hf chat template's: none)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 8  # most requests per engine batch
    max_batch_tokens: int | None = None  # most padded prompt tokens (requests x longest) per batch; None: no cap
    max_prompt_tokens: int | None = None  # longest prompt a record may have (unpruned); None: the model's limit
    logprobs: bool = False  # add per-token ids and log-probabilities to each row
    kept: bool = False  # add the kept visual token indices to each row (to draw what PTP kept)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    workers: int = 2  # image loading / tiling threads
    max_errors: int | None = None  # failed records (any kind) that stop the run (RunAborted); None: no cap

    def resolved_device(self) -> torch.device:
        from ptp_cli.devices import resolve_device  # torch: only what runs the model needs it

        return resolve_device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        from ptp_cli.devices import resolve_dtype

        return resolve_dtype(self.dtype, device)

    def validate(self) -> RunConfig:
        """Every check that needs no model (run and pruning settings); raise UsageError, else return self."""
        check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.min_tiles is not None and self.max_tiles is not None and self.min_tiles > self.max_tiles:
            raise UsageError(f"--min-tiles ({self.min_tiles}) is larger than --max-tiles ({self.max_tiles})")
        self.prune.check()
        return self

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
    config.validate().prune.check_layers(model_cfg)
    config.tiling(model_cfg)
    if config.engine == "vllm" and METHODS[config.prune.method].capabilities.prunes_in_llm:
        raise UsageError(in_llm_with_vllm(config.prune.method))
    if config.engine == "vllm" and config.prune.positions == "original" and config.prune.method != "none":
        raise UsageError(original_positions_with_vllm())
    return model_dir, model_cfg


def in_llm_with_vllm(method: str) -> str:
    """The one line that refuses an in-LLM method under --engine vllm (vLLM's layers keep every token)."""
    return (f"--method {method} prunes inside the LLM, which only ptp's own engine runs: use --engine ptp "
            "(vLLM serves the pre-LLM methods: none, ptp, random, spatial, pool, tiles)")


def original_positions_with_vllm() -> str:
    """The one line that refuses --positions original under --engine vllm (it numbers prompt embeddings 0..n-1)."""
    return ("--positions original needs explicit RoPE positions, which vLLM's prompt-embedding input cannot take: "
            "use --positions contiguous with --engine vllm, or --engine ptp")
