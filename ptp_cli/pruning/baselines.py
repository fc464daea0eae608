"""Pre-LLM baselines: random (seeded, over the whole sample) and spatial (a regular grid per tile)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ptp_cli.pruning.base import ConfiguredMethod, VisualContext
from ptp_cli.pruning.budgets import keep_count, tile_budgets


class RandomPruning(ConfiguredMethod):
    """K = round((1 - ratio) * N) tokens uniformly at random over all tiles of the sample.

    Drawn from a CPU generator seeded with the request's seed, so the choice depends on the seed and the
    sample's size only: not on the batch around it, nor on the device.
    """

    name = "random"

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for t, seed in zip(ctx.tiles, ctx.seeds, strict=True):
            n = t * ctx.tokens_per_tile
            k = keep_count(n, self.cfg.ratio)
            if k == n:
                out.append(None)
                continue
            gen = torch.Generator(device="cpu").manual_seed(seed)
            out.append(torch.randperm(n, generator=gen)[:k].sort().values)
        return out

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "ratio": self.cfg.ratio, "positions": self.cfg.positions}


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


class SpatialPruning(ConfiguredMethod):
    """Per tile, a regular grid of b_i tokens; b_i are PTP's budgets (CLS-similarity regions, or uniform)."""

    name = "spatial"

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        if self.cfg.ratio == 0:
            return [None] * len(ctx.tiles)
        side = math.isqrt(ctx.tokens_per_tile)
        out: list[torch.Tensor | None] = []
        for i in range(len(ctx.tiles)):
            budgets = tile_budgets(ctx, i, self.cfg)
            out.append(torch.cat([grid_indices(b, side) + t * ctx.tokens_per_tile for t, b in enumerate(budgets)]))
        return out

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"method": self.name, "ratio": c.ratio, "tau": c.tau, "region_budgets": c.region_budgets,
                "positions": c.positions}
