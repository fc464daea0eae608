"""Two-stage pruning (``--vit-prune R``): what ptp, random and spatial share to prune inside the ViT first.

Stage 1 runs after ViT layer L (``--vit-layer``): each method keeps a set of 2x2 patch blocks per tile (one block
is one LLM token after pixel shuffle) and the ViT's later layers, the pixel shuffle and the projector run on
those only. Stage 1 keeps ``round((1 - R) * N)`` tokens per sample, shared over the tiles like PTP's budgets but
from the CLS embeddings of layer L (the last layer's are not computed yet). With ``vit_prune_thumbnail`` off
the thumbnail keeps all 256 and the local tiles share ``round((1 - R) * 256 * (T - 1))``.

Stage 2 is the method's usual choice at ``--ratio``, among the survivors: its budgets (from the last layer's CLS,
as without stage 1) are capped by what each tile still has, the excess going to the tiles with room in order
of region importance, so they still sum to exactly ``round((1 - ratio) * N)``.
"""

from __future__ import annotations

import torch

from ptp_cli.pruning.base import ConfiguredMethod, VisualContext
from ptp_cli.pruning.budgets import region_budgets, region_importance, tile_budgets


def stage1_budgets(ctx: VisualContext, i: int, *, ratio: float, tau: float, use_regions: bool,
                   thumbnail: bool) -> list[int]:
    """Blocks each tile of sample i keeps inside the ViT (``ctx.cls`` holds layer L's CLS embeddings)."""
    t, thumb, n = ctx.tiles[i], ctx.has_thumbnail[i], ctx.tokens_per_tile
    scores = region_importance(ctx.cls[i], has_thumbnail=thumb) if use_regions else None
    if not thumb or thumbnail:
        return region_budgets(scores, tiles=t, has_thumbnail=thumb, ratio=ratio, tau=tau, tokens_per_tile=n,
                              use_regions=use_regions)
    local = region_budgets(scores, tiles=t - 1, has_thumbnail=False, ratio=ratio, tau=tau, tokens_per_tile=n,
                           use_regions=use_regions)
    return [*local, n]


def fit_budgets(budgets: list[int], caps: list[int], priority: list[float]) -> list[int]:
    """``budgets`` cut to ``caps`` (per tile), the excess handed to tiles with room, highest ``priority`` first
    (ties: lower index). The sum is kept; requires sum(budgets) <= sum(caps)."""
    if sum(budgets) > sum(caps):
        raise ValueError(f"budgets {budgets} do not fit under caps {caps}")
    out = [min(b, c) for b, c in zip(budgets, caps, strict=True)]
    excess = sum(budgets) - sum(out)
    for t in sorted(range(len(out)), key=lambda t: (-priority[t], t)):
        give = min(excess, caps[t] - out[t])
        out[t] += give
        excess -= give
    return out


def survivors_per_tile(available: torch.Tensor, tiles: int, tokens_per_tile: int) -> list[int]:
    """How many of each tile's tokens survived stage 1. available [K1] sorted indices in [0, T*256)."""
    return torch.bincount(available.cpu() // tokens_per_tile, minlength=tiles).tolist()


def stage2_budgets(ctx: VisualContext, i: int, method: ConfiguredMethod) -> list[int]:
    """The method's usual per-tile budgets for sample i, fitted under what stage 1 left in each tile."""
    budgets = tile_budgets(ctx, i, method.cfg)
    available = ctx.available[i] if ctx.available is not None else None
    if available is None:
        return budgets
    caps = survivors_per_tile(available, ctx.tiles[i], ctx.tokens_per_tile)
    # Priority: region importance (the thumbnail, which has none, last); uniform budgets: tile order.
    importance = region_importance(ctx.cls[i], has_thumbnail=ctx.has_thumbnail[i])
    priority = [0.0] * ctx.tiles[i] if importance is None or not method.cfg.region_budgets else \
        [*importance.tolist(), float("-inf")]
    return fit_budgets(budgets, caps, priority)


def availability_mask(ctx: VisualContext, i: int) -> torch.Tensor | None:
    """[T, 256] True where sample i's token survived stage 1; None without stage 1."""
    available = ctx.available[i] if ctx.available is not None else None
    if available is None:
        return None
    mask = torch.zeros(ctx.tiles[i] * ctx.tokens_per_tile, dtype=torch.bool)
    mask[available.cpu()] = True
    return mask.view(ctx.tiles[i], ctx.tokens_per_tile)


def note_stage1(ctx: VisualContext) -> None:
    """Record in each sample's notes what stage 1 kept (``ptp show`` draws it; FLOPs count the shorter ViT)."""
    if ctx.available is None:
        return
    for i, available in enumerate(ctx.available):
        if available is not None:
            ctx.notes[i]["vit_kept"] = available.tolist()
            ctx.notes[i]["vit_kept_per_tile"] = survivors_per_tile(available, ctx.tiles[i], ctx.tokens_per_tile)


class TwoStage(ConfiguredMethod):
    """Base of the methods that can prune inside the ViT: the stage-1 layer and the settings it adds."""

    prunes_in_vit = True

    def vit_prune_layer(self) -> int | None:
        return self.cfg.vit_layer if self.cfg.vit_prune > 0 else None

    def stage1_budgets(self, ctx: VisualContext, i: int) -> list[int]:
        c = self.cfg
        return stage1_budgets(ctx, i, ratio=c.vit_prune, tau=c.tau, use_regions=c.region_budgets,
                              thumbnail=c.vit_prune_thumbnail)

    def stage1_settings(self) -> dict[str, object]:
        """The stage-1 settings for ``settings()``: none when off, so earlier outputs still resume."""
        c = self.cfg
        if c.vit_prune == 0:
            return {}
        return {"vit_prune": c.vit_prune, "vit_layer": c.vit_layer, "vit_prune_thumbnail": c.vit_prune_thumbnail}
