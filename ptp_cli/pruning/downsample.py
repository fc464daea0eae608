"""The downsampling baselines a skeptic asks for, at PTP's visual-token budget: ``pool`` and ``tiles``.

``pool`` averages neighbouring tokens of each tile: every tile's 16 x 16 grid is cut into ``b`` rectangular
groups of neighbours (``b`` the tile's uniform budget), and each group becomes one token, its mean, placed at the
group's first (top-left) token. ``tiles`` asks the input step for fewer tiles (``retile.fewer_tiles``), so the ViT
sees the same image at a lower resolution; when even one 448 px view is over the budget (a small image at a high
ratio), that view is pooled down to it as ``pool`` would.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ptp_cli.pruning.base import ConfiguredMethod, VisualContext
from ptp_cli.pruning.budgets import keep_count, region_budgets


def _spans(total: int, parts: int) -> list[tuple[int, int]]:
    """``total`` consecutive units cut into ``parts`` contiguous [start, end) spans, larger ones first."""
    out, start = [], 0
    for p in range(parts):
        size = total // parts + (p < total % parts)
        out.append((start, start + size))
        start += size
    return out


def pool_groups(b: int, side: int) -> list[list[int]]:
    """``b`` groups of neighbouring tokens covering a side x side grid (row-major indices), in row-major order of
    their first token; each group is a rectangle.

    A group covers about side^2 / b tokens: ``h = floor(sqrt(side^2 / b))`` rows tall (so 2x1 groups at half the
    tokens, 2x2 at a quarter), the rows cut into ``round(side / h)`` bands, the ``b`` groups shared over the bands
    (earlier bands take the extra ones) and each band's columns cut evenly among its groups.
    """
    n = side * side
    if not 1 <= b <= n:
        raise ValueError(f"pool budget {b} outside 1..{n}")
    h = max(1, math.isqrt(n // b))
    bands = _spans(side, min(b, side, max(1, round(side / h))))
    groups = []
    counts = [e - s for s, e in _spans(b, len(bands))]  # groups per band
    for (r0, r1), count in zip(bands, counts, strict=True):
        for c0, c1 in _spans(side, count):
            groups.append([r * side + c for r in range(r0, r1) for c in range(c0, c1)])
    return groups


def pooled(features: torch.Tensor, groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, D], groups of token indices -> (first index of each group [K], features [N, D] with each
    group's mean written over its first token; the other tokens of a group are dropped by the caller)."""
    out = features.clone()
    firsts = torch.stack([g[0] for g in groups])  # [K]
    for g in groups:
        out[g[0]] = features[g].float().mean(0).to(features.dtype)
    return firsts, out


def _tile_groups(tiles: int, budgets: list[int], tokens_per_tile: int) -> list[torch.Tensor]:
    side = math.isqrt(tokens_per_tile)
    return [torch.tensor(g, dtype=torch.long) + t * tokens_per_tile
            for t in range(tiles) for g in pool_groups(budgets[t], side) if budgets[t] > 0]


class _Pooling(ConfiguredMethod):
    """What pool and tiles share: per-sample groups from ``budgets``; ``select`` keeps each group's first token
    and ``merge_features`` writes the groups' means there."""

    def budgets(self, ctx: VisualContext, i: int) -> list[int] | None:
        raise NotImplementedError

    def groups(self, ctx: VisualContext) -> list[list[torch.Tensor] | None]:
        out: list[list[torch.Tensor] | None] = []
        for i, t in enumerate(ctx.tiles):
            b = self.budgets(ctx, i)
            out.append(None if b is None else _tile_groups(t, b, ctx.tokens_per_tile))
        return out

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        return [None if g is None else torch.stack([x[0] for x in g]) for g in self.groups(ctx)]

    def merge_features(self, ctx: VisualContext, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for f, g in zip(features, self.groups(ctx), strict=True):
            out.append(f if g is None else pooled(f, [x.to(f.device) for x in g])[1])
        return out


class PoolPruning(_Pooling):
    """Per tile, b_i groups of neighbouring tokens averaged into one each (2x1 at ratio 0.5, 2x2 at 0.75); b_i
    are uniform budgets that add up to K. The pooled token sits at its group's first token."""

    name = "pool"

    def budgets(self, ctx: VisualContext, i: int) -> list[int] | None:
        if self.cfg.ratio == 0:
            return None
        return region_budgets(None, tiles=ctx.tiles[i], has_thumbnail=ctx.has_thumbnail[i], ratio=self.cfg.ratio,
                              tokens_per_tile=ctx.tokens_per_tile, use_regions=False)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "ratio": self.cfg.ratio, "positions": self.cfg.position_mode}


class TilesPruning(_Pooling):
    """Fewer tiles: the image re-tiled with the most tiles whose tokens fit K (thumbnail kept); the input step
    does it (``retiles``). A single view over the budget is pooled down to K."""

    name = "tiles"
    retiles = True

    def budgets(self, ctx: VisualContext, i: int) -> list[int] | None:
        n = ctx.tiles[i] * ctx.tokens_per_tile
        k = keep_count(ctx.full_tiles[i] * ctx.tokens_per_tile, self.cfg.ratio)
        if k >= n:
            return None
        return region_budgets(None, tiles=ctx.tiles[i], has_thumbnail=ctx.has_thumbnail[i], ratio=1 - k / n,
                              tokens_per_tile=ctx.tokens_per_tile, use_regions=False)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "ratio": self.cfg.ratio, "positions": self.cfg.position_mode}
