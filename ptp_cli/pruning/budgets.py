"""How many visual tokens each tile keeps (PTP step 2), and the one rounding rule every method uses.

Every budget in ptp is computed here: PTP and the spatial baseline share ``tile_budgets``.

Rounding: ``keep_count`` is Python's ``round`` (ties to even: 128.5 -> 128, 127.5 -> 128), the literal
``round()`` of PTP.md and the same rule as ``torch.round``. Every kept count in ptp goes through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ptp_cli.pruning.base import VisualContext
from ptp_cli.pruning.settings import PruneConfig


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept out of n when a fraction ``ratio`` is pruned: round((1 - ratio) * n), ties to even."""
    return round((1.0 - ratio) * n)


def _share(total: int, scores: list[float], *, tau: float, cap: int) -> list[int]:
    """Split ``total`` over regions in proportion to softmax(scores / tau), each at most ``cap``, summing exactly.

    A quota above ``cap`` is cut there and its overflow is added to the next region in order of p (that is,
    of score; equal scores by index). The floors of the quotas are then topped up one unit at a time by
    largest fractional part (ties in order of p). Requires total <= len(scores) * cap.
    """
    n = len(scores)
    r = torch.tensor(scores, dtype=torch.float64)
    e = torch.exp((r - r.max()) / tau)  # largest term is exp(0) = 1: no overflow, no 0/0
    p = (e / e.sum()).tolist()
    order = sorted(range(n), key=lambda i: (-scores[i], i))  # p is monotone in the score
    quota = [total * pi for pi in p]
    carry = 0.0
    for i in order:
        q = quota[i] + carry
        carry = max(q - cap, 0.0)
        quota[i] = min(q, float(cap))
    budget = [min(math.floor(q), cap) for q in quota]
    rank = {i: k for k, i in enumerate(order)}
    by_fraction = sorted(range(n), key=lambda i: (budget[i] - quota[i], rank[i]))  # largest fraction first
    left = total - sum(budget)  # < n up to float drift; the loop repeats only for that drift
    while left > 0:
        for i in by_fraction:
            if left > 0 and budget[i] < cap:
                budget[i] += 1
                left -= 1
    return budget


def region_budgets(
    region_scores: torch.Tensor | None,
    *,
    tiles: int,
    has_thumbnail: bool,
    ratio: float,
    tau: float = 1.0,
    tokens_per_tile: int = 256,
    use_regions: bool = True,
) -> list[int]:
    """Kept tokens per tile (the thumbnail, when present, last); they sum to exactly keep_count(N, ratio).

    region_scores [R]: importance of each local region (R = tiles - 1 with a thumbnail, else tiles), or None.
    The thumbnail keeps round((1 - ratio) * 256); the regions share the rest by softmax(scores / tau), or
    evenly when scores are None or ``use_regions`` is False (equal shares, extra units to lower indices).
    """
    k = keep_count(tiles * tokens_per_tile, ratio)
    thumb = has_thumbnail and tiles > 1
    n_regions = tiles - thumb
    capacity = n_regions * tokens_per_tile
    b_g = min(keep_count(tokens_per_tile, ratio), k) if thumb else 0
    rest = k - b_g
    if rest > capacity:  # rounding K and b_g separately can never push this past the regions, but stay exact
        b_g, rest = b_g + rest - capacity, capacity
    if region_scores is None or not use_regions:
        scores = [0.0] * n_regions
    else:
        if region_scores.numel() != n_regions:
            raise ValueError(f"expected {n_regions} region scores, got {region_scores.numel()}")
        scores = [float(v) for v in region_scores.tolist()]
    budgets = _share(rest, scores, tau=tau, cap=tokens_per_tile)
    return [*budgets, b_g] if thumb else budgets


def region_importance(cls: torch.Tensor, *, has_thumbnail: bool) -> torch.Tensor | None:
    """r_i = cos(CLS_i, CLS_thumbnail) for each local tile; cls [T, Cv] -> [T-1], or None without a thumbnail."""
    if not has_thumbnail or cls.shape[0] < 2:
        return None
    return F.cosine_similarity(cls[:-1].float(), cls[-1:].float(), dim=-1)


def tile_budgets(ctx: VisualContext, i: int, cfg: PruneConfig) -> list[int]:
    """PTP step 2 for sample i: per-tile budgets (regions by CLS similarity unless region budgets are off)."""
    scores = region_importance(ctx.cls[i], has_thumbnail=ctx.has_thumbnail[i]) if cfg.region_budgets else None
    return region_budgets(
        scores, tiles=ctx.tiles[i], has_thumbnail=ctx.has_thumbnail[i], ratio=cfg.ratio, tau=cfg.tau,
        tokens_per_tile=ctx.tokens_per_tile, use_regions=cfg.region_budgets,
    )
