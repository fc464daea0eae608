"""The user's pruning settings (one frozen dataclass), named presets, and the factory that builds a method.

Imports no torch (the registry, ``catalog.py``, names the methods): the CLI checks these settings before
torch loads. ``make_method`` imports the method's class, and torch with it.

Sampling and random pruning are seeded per request (``Request.seed``), so no seed lives here.
Layer options follow one convention: "after layer K" means the first K decoder layers (0-based 0..K-1) see
every token and layer K onward sees the pruned sequence; the drop is decided from layer K-1's attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from ptp_cli.config import ModelConfig
from ptp_cli.errors import UsageError
from ptp_cli.pruning import catalog
from ptp_cli.settings import AUTO, check_fields, default

if TYPE_CHECKING:
    from ptp_cli.pruning.base import PruningMethod


@dataclass(frozen=True)
class PruneConfig:
    # Defaults and allowed values: ptp_cli/settings.py.
    method: str = default("method")  # a name in catalog.METHODS
    ratio: float = default("ratio")  # fraction of visual tokens pruned (ignored by none, vtw and pdrop)
    # PTP fusion weight of the instruction score c against the token score s, or "auto": chosen per sample from
    # how concentrated s and c are (``adaptive.auto_alpha``)
    alpha: float | str = default("alpha")
    vit_layer: int = default("vit_layer")  # PTP's L: 0-based ViT layer whose CLS attention gives s
    llm_layer: int = default("llm_layer")  # PTP's M: 0-based LLM layer whose instruction attention gives c
    tau: float = default("tau")  # softmax temperature of the region importance
    head_agg: str = default("head_agg")  # attention reduced over heads (ViT, probe, FastV, PDrop): mean | max
    instr_agg: str = default("instr_agg")  # how the probe reduces over instruction tokens: max | mean
    region_budgets: bool = default("region_budgets")  # per-region budgets from CLS similarity; False: uniform
    use_token_score: bool = default("token_score")  # PTP's s; False is the "without s" ablation (needs alpha > 0)
    fastv_layer: int = default("fastv_layer")  # FastV's K_f: drop after layer K_f, ranked at layer K_f - 1
    vtw_layer: int | None = default("vtw_layer")  # VTW's K_w: no visual token after layer K_w; None: half
    pdrop_layers: tuple[int, ...] | None = default("pdrop_layers")  # PyramidDrop stage ends; None: 1/4, 2/4, 3/4
    pdrop_keep: float = default("pdrop_keep")  # fraction of the remaining visual tokens each stage keeps
    # Stage 1 inside the ViT (ptp, random, spatial): after ViT layer vit_layer, drop this fraction of the 2x2 patch
    # blocks (one block = one LLM token) and run the later ViT layers on the rest; in [0, ratio], 0: off
    # RoPE positions after pre-LLM pruning: "original" (each kept token, and the text after the image, keeps its
    # unpruned position; from docs/accuracy.md's measurements) or "contiguous" (the pruned prompt numbered 0..n-1:
    # the paper's reading, and what vLLM's prompt embeddings allow); None: the engine's (RunConfig resolves it:
    # original on ptp's engine, contiguous on vLLM; alone, original). In-LLM methods always keep positions.
    positions: str | None = default("positions")
    vit_prune: float = default("vit_prune")
    vit_prune_thumbnail: bool = default("vit_prune_thumbnail")  # stage 1 prunes the thumbnail too (False: whole)

    def __post_init__(self) -> None:
        """The one check of the settings that need no model: ranges, names, combinations."""
        check_fields("prune", {f.name: getattr(self, f.name) for f in fields(self)})
        if self.method == "ptp" and not self.use_token_score and self.alpha == 0:
            raise UsageError("--no-token-score needs --alpha > 0 (nothing would rank the tokens)")
        if self.method == "ptp" and not self.use_token_score and self.alpha == AUTO:
            raise UsageError(f"--no-token-score does not go with --alpha {AUTO} (the rule weighs s against c)")
        if self.vit_prune > 0 and not catalog.METHODS[self.method].capabilities.prunes_in_vit:
            able = ", ".join(n for n, e in catalog.METHODS.items() if e.capabilities.prunes_in_vit)
            raise UsageError(f"--vit-prune goes with --method {able}, not {self.method}")
        if self.vit_prune > self.ratio:
            raise UsageError(f"--vit-prune must be at most --ratio ({self.ratio:g}), got {self.vit_prune:g}")

    @property
    def position_mode(self) -> str:
        """The positions this config asks for: ``positions``, or original where the engine did not decide."""
        return self.positions or "original"

    def with_positions(self, mode: str) -> PruneConfig:
        """This config with ``positions`` decided (a mode of ``POSITION_MODES``): a copy, not checked again (no
        check involves the positions, and each value is checked once)."""
        out = copy.copy(self)
        object.__setattr__(out, "positions", mode)
        return out

    def resolved_vtw_layer(self, model_cfg: ModelConfig) -> int:
        return model_cfg.llm.num_layers // 2 if self.vtw_layer is None else self.vtw_layer

    def resolved_pdrop_layers(self, model_cfg: ModelConfig) -> tuple[int, ...]:
        n = model_cfg.llm.num_layers
        return tuple(n * k // 4 for k in (1, 2, 3)) if self.pdrop_layers is None else tuple(self.pdrop_layers)

    def check_layers(self, model_cfg: ModelConfig) -> PruneConfig:
        """The layer indices against the model's depth (only its config is needed). Return self."""
        # Layer indices depend on the model; each is checked for the method that uses it.
        vit_layers, llm_layers = model_cfg.vision.num_layers, model_cfg.llm.num_layers
        if self.method == "ptp" or self.vit_prune > 0:
            if not 0 <= self.vit_layer < vit_layers:
                raise UsageError(f"--vit-layer must be in [0, {vit_layers - 1}] for this model, got {self.vit_layer}")
            if self.method == "ptp" and not 0 <= self.llm_layer < llm_layers:
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


def plan_grid(base: PruneConfig, methods: tuple[str, ...], ratios: tuple[float, ...], model_cfg: ModelConfig, *,
              positions: tuple[str, ...] = (), vit_prunes: tuple[float, ...] = ()) -> list[tuple[str, PruneConfig]]:
    """The runs of a (method x ratio) grid over ``base``, as ``ptp eval`` and ``ptp bench`` both plan them:
    ("ptp@0.5", settings) per ratio for a method that uses one, ("none", settings) once for one that does not;
    with ``positions`` (a grid axis), each pre-LLM method once per mode ("ptp@0.5,positions=original"); and for a
    method that prunes inside the ViT, ("ptp@0.5,vit=0.25", settings) per value of ``vit_prunes`` up to the
    ratio. Each method's settings are checked against the model before any run starts."""
    runs: list[tuple[str, PruneConfig]] = []
    for method in methods:
        cls = catalog.method_class(method)
        vit = base.vit_prune if cls.prunes_in_vit else 0.0  # --vit-prune applies where the method can
        per_ratio = [replace(base, method=method, ratio=r, vit_prune=vit) for r in ratios]
        per_ratio[0].check_layers(model_cfg)  # a bad layer fails before anything runs or is built
        if not cls.uses_ratio:  # none, vtw, pdrop: the ratio changes nothing (and they keep positions)
            runs.append((method, per_ratio[0]))
            continue
        for r, p in zip(ratios, per_ratio, strict=True):
            if not positions or cls.prunes_in_llm:
                runs.append((f"{method}@{r:g}", p))
            else:
                runs += [(f"{method}@{r:g},positions={mode}", replace(p, positions=mode)) for mode in positions]
        if cls.prunes_in_vit:
            runs += [(f"{method}@{r:g},vit={v:g}", replace(base, method=method, ratio=r, vit_prune=v))
                     for r in ratios for v in vit_prunes if 0 < v <= r]
    return runs


def make_method(cfg: PruneConfig, model_cfg: ModelConfig) -> PruningMethod:
    """The method ``cfg`` names, for this model. ``cfg`` was checked when built; its layer indices against this
    model by ``check_layers`` (``read_model_config`` and ``Pipeline`` call it once per run)."""
    return catalog.method_class(cfg.method).build(cfg, model_cfg)
