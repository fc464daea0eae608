"""Pre-LLM baselines: random (seeded, over the whole sample) and spatial (a regular grid per tile)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ptp_cli.pruning.base import VisualContext
from ptp_cli.pruning.budgets import keep_count
from ptp_cli.pruning.vitprune import TwoStage, note_stage1, stage2_budgets, survivors_per_tile


def _order(n: int, seed: int) -> torch.Tensor:
    """The random baseline's order of a sample's n tokens: a permutation drawn from a CPU generator seeded with
    the request's seed. Every stage keeps a prefix of it (restricted to what an earlier stage kept)."""
    return torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))


class RandomPruning(TwoStage):
    """K = round((1 - ratio) * N) tokens uniformly at random over all tiles of the sample.

    Drawn from a CPU generator seeded with the request's seed, so the choice depends on the seed and the
    sample's size only: not on the batch around it, nor on the device. With stage 1 (``--vit-prune R``) the ViT
    keeps the first round((1 - R) * N) tokens of the same permutation (the thumbnail whole, if it is not
    pruned there), and the final choice is the first K survivors in that order: with the thumbnail pruned too,
    exactly the tokens chosen without stage 1, so the control isolates what the shorter ViT changes.
    """

    name = "random"

    def vit_select(self, ctx: VisualContext) -> list[torch.Tensor]:
        out = []
        for i, (t, seed) in enumerate(zip(ctx.tiles, ctx.seeds, strict=True)):
            n, per = t * ctx.tokens_per_tile, ctx.tokens_per_tile
            whole = ctx.has_thumbnail[i] and not self.cfg.vit_prune_thumbnail  # the thumbnail skips stage 1
            order = _order(n, seed)
            if whole:
                local = order[order < n - per]
                kept = torch.cat([local[: keep_count(n - per, self.cfg.vit_prune)], torch.arange(n - per, n)])
            else:
                kept = order[: keep_count(n, self.cfg.vit_prune)]
            out.append(kept.sort().values)
        return out

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        note_stage1(ctx)
        out: list[torch.Tensor | None] = []
        for i, (t, seed) in enumerate(zip(ctx.tiles, ctx.seeds, strict=True)):
            n = t * ctx.tokens_per_tile
            k = keep_count(n, self.cfg.ratio)
            available = ctx.available[i] if ctx.available is not None else None
            if k == n and available is None:
                out.append(None)
                continue
            order = _order(n, seed)
            if available is not None:
                alive = torch.zeros(n, dtype=torch.bool)
                alive[available.cpu()] = True
                order = order[alive[order]]  # the survivors, in the permutation's order
            out.append(order[:k].sort().values)
        return out

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "ratio": self.cfg.ratio, "positions": self.cfg.position_mode, **self.stage1_settings()}


def grid_indices(b: int, side: int) -> torch.Tensor:
    """b token indices spread evenly over a side x side grid (row-major), sorted.

    Rows: about sqrt(b) of them (at least ceil(b / side)), evenly spaced; the b tokens are shared over those
    rows as evenly as possible (extra ones to the earlier rows) and evenly spaced within each row. A square
    b = (side/s)^2 gives exactly the stride-s grid (b = 64 on 16 x 16: rows and columns 1, 3, ..., 15).
    """
    if b <= 0:
        return torch.zeros(0, dtype=torch.long)
    rows = min(side, max(math.ceil(b / side), round(math.sqrt(b))))
    out = []
    for r in range(rows):
        count = b // rows + (r < b % rows)
        row = (2 * r + 1) * side // (2 * rows)  # centre of the r-th of `rows` equal bands
        out += [row * side + (2 * c + 1) * side // (2 * count) for c in range(count)]
    return torch.tensor(sorted(out), dtype=torch.long)


def spread(items: torch.Tensor, b: int) -> torch.Tensor:
    """b of the sorted ``items`` [n], evenly spaced in their order (the centre of each of b equal runs)."""
    n = items.numel()
    return items[[(2 * j + 1) * n // (2 * b) for j in range(b)]] if b > 0 else items[:0]


class SpatialPruning(TwoStage):
    """Per tile, a regular grid of b_i tokens; b_i are PTP's budgets (CLS-similarity regions, or uniform).

    With stage 1 (``--vit-prune R``) the ViT keeps a regular grid of each tile's stage-1 budget; the final b_i
    are then spread evenly over each tile's survivors, in row-major order.
    """

    name = "spatial"

    def vit_select(self, ctx: VisualContext) -> list[torch.Tensor]:
        side, per = math.isqrt(ctx.tokens_per_tile), ctx.tokens_per_tile
        return [torch.cat([grid_indices(b, side) + t * per for t, b in enumerate(self.stage1_budgets(ctx, i))])
                for i in range(len(ctx.tiles))]

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        if self.cfg.ratio == 0:
            return [None] * len(ctx.tiles)
        note_stage1(ctx)
        side, per = math.isqrt(ctx.tokens_per_tile), ctx.tokens_per_tile
        out: list[torch.Tensor | None] = []
        for i in range(len(ctx.tiles)):
            budgets = stage2_budgets(ctx, i, self)
            available = ctx.available[i] if ctx.available is not None else None
            if available is None:
                out.append(torch.cat([grid_indices(b, side) + t * per for t, b in enumerate(budgets)]))
                continue
            tiles = available.cpu().split(survivors_per_tile(available, ctx.tiles[i], per))  # each tile's survivors
            out.append(torch.cat([spread(s, b) for s, b in zip(tiles, budgets, strict=True)]))
        return out

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"method": self.name, "ratio": c.ratio, "tau": c.tau, "region_budgets": c.region_budgets,
                "positions": c.position_mode, **self.stage1_settings()}
