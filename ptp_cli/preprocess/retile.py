"""The input step of the ``tiles`` baseline: the same image on fewer tiles, at PTP's visual-token budget.

The budget is ``K = round((1 - ratio) * N)`` of the tiling the run would use (``N = 256 * T``). The image is
re-tiled with the largest tile cap whose tiles (thumbnail included) give at most ``K`` tokens, by InternVL2's own
grid rule; a cap of 1 gives one whole-image view, which the method pools down to ``K`` if even that is too many.
"""

from __future__ import annotations

import dataclasses

from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.pruning.budgets import keep_count


def fewer_tiles(tiling: TilingOptions, width: int, height: int, *, ratio: float,
                tokens_per_tile: int) -> tuple[TilingOptions, int]:
    """(the tiling that fits the budget, the tiles the run's tiling would have cut) for a width x height image."""
    full = tiling.num_tiles(width, height)
    budget = keep_count(full * tokens_per_tile, ratio)
    for cap in range(tiling.max_tiles, 0, -1):
        fewer = dataclasses.replace(tiling, max_tiles=cap, min_tiles=min(tiling.min_tiles, cap))
        if fewer.num_tiles(width, height) * tokens_per_tile <= budget:
            return fewer, full
    return dataclasses.replace(tiling, max_tiles=1, min_tiles=1), full
