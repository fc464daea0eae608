"""The one interface every pruning method implements, and the registry that selects methods by name.

Every method declares what it needs and where it acts as class attributes (``uses_ratio``,
``needs_vit_scores``, ``needs_probe``, ``prunes_in_llm``), the same as its entry in ``catalog.py``, the
torch-free registry of methods by name. A method without settings (``none``) is built with no arguments; the
methods that read the user's settings derive from ``ConfiguredMethod``; ``settings.make_method`` builds either.

A method can act at two points of the engine:

* before the LLM (``select``): it sees each sample's ViT outputs (CLS embeddings, optional CLS->patch
  token scores) and, optionally, the instruction scores of a probe through LLM layers 0..M, and returns
  the visual tokens to keep;
* between LLM layers during prefill (``after_layer``): it sees layer j's hidden states, queries and keys
  and returns a keep mask; tokens it drops are gone from every later layer (and from their KV caches).

The engine knows nothing about any method; a method knows nothing about tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ptp_cli.config import ModelConfig
    from ptp_cli.pruning.settings import PruneConfig


@dataclass
class VisualContext:
    """What a pre-LLM method sees for one batch. Lists are per sample, in batch order."""

    tiles: list[int]  # tiles of each sample (the thumbnail, when present, is the last)
    has_thumbnail: list[bool]  # whether the last tile is a thumbnail
    tokens_per_tile: int  # 256
    cls: list[torch.Tensor]  # [T_i, Cv] last-layer CLS embedding of each tile
    token_scores: list[torch.Tensor] | None  # [T_i, 256] CLS->patch attention at the ViT score layer, pooled
    instruction_scores: list[torch.Tensor] | None  # [T_i * 256] probe scores of the visual tokens
    seeds: list[int]  # per-sample seed (random baseline)
    # Per sample, the tokens that survived pruning inside the ViT (sorted indices in [0, T_i * 256); None: all);
    # ``select`` keeps a subset of them. With stage 1, cls and token_scores come from the pruned ViT's layers.
    available: list[torch.Tensor | None] | None = None
    # Tiles each sample would have had before a ``retiles`` method asked for fewer (its budget's base); empty:
    # the same as ``tiles``
    full_tiles: list[int] = field(default_factory=list)
    # Per sample, what the method reports about its choice (PTP: the alpha used and its signals): ``select``
    # may fill these dicts; the engine returns them in ``Result.pruning`` and the pipeline writes them to the
    # row under "pruning". Empty dicts (one per sample) unless given.
    notes: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.notes:
            self.notes = [{} for _ in self.tiles]
        if not self.full_tiles:
            self.full_tiles = list(self.tiles)


@dataclass
class LayerState:
    """What an in-LLM method sees after decoder layer j during prefill (a right-padded batch)."""

    layer: int  # j, 0-based
    hidden: torch.Tensor  # [B, S, D] output of layer j
    q: torch.Tensor  # [B, Hq, S, hd] queries of layer j, RoPE applied
    keys: torch.Tensor  # [B, Hkv, S, hd] keys of layer j, RoPE applied
    valid: torch.Tensor  # [B, S] real tokens (False: padding, at the end of a row)
    visual: torch.Tensor  # [B, S] visual tokens
    instruction: torch.Tensor  # [B, S] tokens of the user's question
    last: torch.Tensor  # [B] index of each sample's last prompt token


class PruningMethod:
    """Base class. Subclasses set ``name`` and their capabilities (as ``catalog.Capabilities`` lists them, and
    as the method's catalog entry says) and override the hooks they use."""

    name: ClassVar[str]
    uses_ratio: ClassVar[bool] = True  # --ratio sets how many visual tokens it drops
    needs_vit_scores: ClassVar[bool] = False  # may ask for the ViT's CLS attention (``vit_score_layer``)
    needs_probe: ClassVar[bool] = False  # may ask for the instruction probe (``probe_layer``)
    prunes_in_llm: ClassVar[bool] = False  # drops tokens between LLM layers (``drop_layers``, ``after_layer``)
    prunes_in_vit: ClassVar[bool] = False  # can drop patch blocks inside the ViT (``vit_prune_layer``, ``vit_select``)
    retiles: ClassVar[bool] = False  # the input step gives it fewer tiles (``retile.fewer_tiles``)

    @classmethod
    def build(cls, cfg: PruneConfig, model_cfg: ModelConfig) -> PruningMethod:
        """The method for these settings; a method without settings ignores them."""
        return cls()

    def vit_score_layer(self) -> int | None:
        """ViT layer whose CLS attention the method needs (``VisualContext.token_scores``), or None."""
        return None

    def head_aggregation(self) -> str:
        """How the ViT and probe attention are reduced over heads: "mean" or "max"."""
        return "mean"

    def probe_layer(self) -> int | None:
        """LLM layer M whose instruction->visual attention the method needs, or None (no probe is run)."""
        return None

    def instruction_aggregation(self) -> str:
        """How the probe reduces over instruction tokens: "max" or "mean"."""
        return "max"

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        """Per sample, the visual token indices to keep (sorted, in [0, T_i*256)), or None to keep all.

        May also record what it decided per sample in ``ctx.notes[i]`` (JSON-ready values)."""
        return [None] * len(ctx.tiles)

    def vit_prune_layer(self) -> int | None:
        """ViT layer after which ``vit_select`` drops patch blocks (later layers run on the rest), or None."""
        return None

    def vit_select(self, ctx: VisualContext) -> list[torch.Tensor]:
        """Stage 1, per sample: the tokens (2x2 patch blocks) whose patches go on through the ViT, sorted indices
        in [0, T_i*256). ``ctx`` holds the CLS embeddings and token scores of layer ``vit_prune_layer``."""
        raise NotImplementedError(f"{self.name} does not prune inside the ViT")

    def merge_features(self, ctx: VisualContext, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample, the visual features [T_i*256, D] the kept tokens take theirs from (after ``select``): a
        method that merges tokens (``pool``) writes each merged token over the index it keeps."""
        return features

    def original_positions(self) -> bool:
        """Whether the kept visual tokens (and the text after them) keep the RoPE positions they had in the
        unpruned prompt; False: the pruned prompt is numbered 0..n-1, as if the image had given only those."""
        return False

    def drop_layers(self) -> frozenset[int]:
        """Layers j after which ``after_layer`` is called during prefill."""
        return frozenset()

    def after_layer(self, state: LayerState) -> torch.Tensor | None:
        """Keep mask [B, S] for the tokens after layer j (must keep every non-visual valid token), or None."""
        return None

    def settings(self) -> dict[str, Any]:
        """The method's settings, echoed in every output row (and used to fingerprint results)."""
        return {"method": self.name}


class NoPruning(PruningMethod):
    """Every visual token reaches every layer."""

    name = "none"
    uses_ratio = False


class ConfiguredMethod(PruningMethod):
    """Base of the methods built from the user's settings (and the model's shape, for layer defaults)."""

    def __init__(self, cfg: PruneConfig, model_cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg

    @classmethod
    def build(cls, cfg: PruneConfig, model_cfg: ModelConfig) -> PruningMethod:
        return cls(cfg, model_cfg)

    def head_aggregation(self) -> str:
        return self.cfg.head_agg

    def original_positions(self) -> bool:
        return self.cfg.position_mode == "original"  # in-LLM methods keep positions whatever this says
