"""The user's pruning settings (one frozen dataclass), named presets, and the factory that builds a method.

Imports no torch (the registry, ``catalog.py``, names the methods): the CLI checks these settings before
torch loads. ``make_method`` imports the method's class, and torch with it.

Sampling and random pruning are seeded per request (``Request.seed``), so no seed lives here.
Layer options follow one convention: "after layer K" means the first K decoder layers (0-based 0..K-1) see
every token and layer K onward sees the pruned sequence; the drop is decided from layer K-1's attention.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from ptp_cli import limits  # the module, read at call time: limits imports the catalog, in this package
from ptp_cli.config import ModelConfig
from ptp_cli.errors import UsageError
from ptp_cli.pruning import catalog

if TYPE_CHECKING:
    from ptp_cli.pruning.base import PruningMethod


@dataclass(frozen=True)
class PruneConfig:
    method: str = "ptp"  # a name in catalog.METHODS: none, ptp, random, spatial, pool, tiles, fastv, vtw, pdrop
    ratio: float = 0.5  # fraction of visual tokens pruned, in [0, 1) (ignored by none, vtw and pdrop)
    # PTP fusion weight of the instruction score c against the token score s, in [0, 1], or "auto": chosen per
    # sample from how concentrated s and c are (``adaptive.auto_alpha``)
    alpha: float | str = 0.5
    vit_layer: int = 11  # PTP's L: 0-based ViT layer whose CLS attention gives s
    llm_layer: int = 1  # PTP's M: 0-based LLM layer whose instruction attention gives c
    tau: float = 1.0  # softmax temperature of the region importance (> 0)
    head_agg: str = "mean"  # how attention is reduced over heads (ViT, probe, FastV, PDrop): mean | max
    instr_agg: str = "max"  # how the probe reduces over instruction tokens: max | mean
    region_budgets: bool = True  # PTP/spatial per-region budgets from CLS similarity; False: uniform budgets
    use_token_score: bool = True  # PTP's s; False is the "without s" ablation (needs alpha > 0)
    fastv_layer: int = 2  # FastV's K_f: drop after layer K_f, ranked by attention received at layer K_f - 1
    vtw_layer: int | None = None  # VTW's K_w: no visual token after layer K_w; None: num_layers // 2
    pdrop_layers: tuple[int, ...] | None = None  # PyramidDrop stage ends; None: 1/4, 2/4, 3/4 of the layers
    pdrop_keep: float = 0.5  # fraction of the remaining visual tokens each PyramidDrop stage keeps, in (0, 1]
    # RoPE positions after pre-LLM pruning: "original" (each kept token, and the text after the image, keeps its
    # unpruned position; the default, from docs/accuracy.md's measurements) or "contiguous" (the pruned prompt
    # numbered 0..n-1: the paper's reading, and what vLLM's prompt embeddings allow); in-LLM methods always keep
    # positions
    positions: str = "original"

    def resolved_vtw_layer(self, model_cfg: ModelConfig) -> int:
        return model_cfg.llm.num_layers // 2 if self.vtw_layer is None else self.vtw_layer

    def resolved_pdrop_layers(self, model_cfg: ModelConfig) -> tuple[int, ...]:
        n = model_cfg.llm.num_layers
        return tuple(n * k // 4 for k in (1, 2, 3)) if self.pdrop_layers is None else tuple(self.pdrop_layers)

    def validate(self, model_cfg: ModelConfig) -> PruneConfig:
        """Raise UsageError naming the offending option; return self when everything is usable."""
        return self.check().check_layers(model_cfg)

    def check(self) -> PruneConfig:
        """The checks that need no model: ranges, names, combinations. Return self."""
        limits.check_values({f.name: getattr(self, f.name) for f in fields(self)})
        if self.method not in catalog.METHODS:
            raise UsageError(f"--method: unknown method {self.method!r}; choose one of {', '.join(sorted(catalog.METHODS))}")
        if self.method == "ptp" and not self.use_token_score and self.alpha == 0:
            raise UsageError("--no-token-score needs --alpha > 0 (nothing would rank the tokens)")
        if self.method == "ptp" and not self.use_token_score and self.alpha == limits.AUTO:
            raise UsageError(f"--no-token-score does not go with --alpha {limits.AUTO} (the rule weighs s against c)")
        return self

    def check_layers(self, model_cfg: ModelConfig) -> PruneConfig:
        """The layer indices against the model's depth (only its config is needed). Return self."""
        # Layer indices depend on the model; each is checked for the method that uses it.
        vit_layers, llm_layers = model_cfg.vision.num_layers, model_cfg.llm.num_layers
        if self.method == "ptp":
            if not 0 <= self.vit_layer < vit_layers:
                raise UsageError(f"--vit-layer must be in [0, {vit_layers - 1}] for this model, got {self.vit_layer}")
            if not 0 <= self.llm_layer < llm_layers:
                raise UsageError(f"--llm-layer must be in [0, {llm_layers - 1}] for this model, got {self.llm_layer}")
        # A drop "after layer K" needs a layer on either side: 1 <= K <= num_layers - 1.
        last = llm_layers - 1
        if self.method == "fastv" and not 1 <= self.fastv_layer <= last:
            raise UsageError(f"--fastv-layer must be in [1, {last}] for this model, got {self.fastv_layer}")
        if self.method == "vtw" and not 1 <= (k := self.resolved_vtw_layer(model_cfg)) <= last:
            raise UsageError(f"--vtw-layer must be in [1, {last}] for this model, got {k}")
        if self.method == "pdrop":
            ks = self.resolved_pdrop_layers(model_cfg)
            if not ks or any(not 1 <= k <= last for k in ks) or list(ks) != sorted(set(ks)):
                raise UsageError(
                    f"--pdrop-layers must be increasing layers in [1, {last}] for this model, got {list(ks)}"
                )
        return self


# Named starting points (catalog.PRESETS); a CLI applies explicit options on top with dataclasses.replace.
PRESETS: dict[str, PruneConfig] = {name: replace(PruneConfig(), **changes) for name, changes in catalog.PRESETS.items()}


def make_method(cfg: PruneConfig, model_cfg: ModelConfig) -> PruningMethod:
    """Validate the settings against the model and build the method they name."""
    cfg.validate(model_cfg)
    return catalog.method_class(cfg.method).build(cfg, model_cfg)
