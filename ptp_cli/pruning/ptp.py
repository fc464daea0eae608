"""Pyramid Token Pruning: region budgets from CLS similarity, then per-tile top-b of fused token/instruction scores."""

from __future__ import annotations

from typing import Any

import torch

from ptp_cli.limits import AUTO
from ptp_cli.pruning.adaptive import auto_alpha, signals
from ptp_cli.pruning.base import ConfiguredMethod, VisualContext
from ptp_cli.pruning.budgets import tile_budgets


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per row min-max normalisation to [0, 1]; a constant row becomes 0. x [T, n]."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def top_per_tile(score: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Indices into the flattened tiles of the top ``budgets[t]`` scores of each tile t, sorted.

    score [T, n]. Ties go to the lower index: a stable ascending sort of -score keeps equal scores in order.
    """
    n = score.shape[1]
    order = torch.sort(-score, dim=-1, stable=True).indices  # [T, n] best first
    kept = [order[t, :b] + t * n for t, b in enumerate(budgets)]
    return torch.cat(kept).sort().values


class PTP(ConfiguredMethod):
    """Score = (1 - alpha) * minmax(s) + alpha * minmax(c) per tile; keep the top b_i tokens of tile i.

    s is dropped (and the ViT read-out skipped) when alpha == 1 or ``use_token_score`` is off; the probe is
    skipped when alpha == 0. At ratio 0 nothing is scored and every token is kept.

    With alpha "auto", both scores are computed and each sample's alpha comes from ``adaptive.auto_alpha``; the
    ranking is then exactly that of the fixed alpha. Every ranked sample notes the alpha used and the
    concentration signals of the scores computed (``ctx.notes``).
    """

    name = "ptp"
    needs_vit_scores = True  # s (unless alpha is 1 or --no-token-score)
    needs_probe = True  # c (unless alpha is 0)

    @property
    def _auto(self) -> bool:
        return self.cfg.alpha == AUTO

    @property
    def _uses_s(self) -> bool:
        return self.cfg.ratio > 0 and self.cfg.use_token_score and (self._auto or self.cfg.alpha < 1)

    @property
    def _uses_c(self) -> bool:
        return self.cfg.ratio > 0 and (self._auto or self.cfg.alpha > 0)

    def vit_score_layer(self) -> int | None:
        return self.cfg.vit_layer if self._uses_s else None

    def probe_layer(self) -> int | None:
        return self.cfg.llm_layer if self._uses_c else None

    def instruction_aggregation(self) -> str:
        return self.cfg.instr_agg

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        if self.cfg.ratio == 0:
            return [None] * len(ctx.tiles)
        n = ctx.tokens_per_tile
        out: list[torch.Tensor | None] = []
        for i, t in enumerate(ctx.tiles):
            s = c = None
            if self._uses_s:
                assert ctx.token_scores is not None
                s = ctx.token_scores[i].float().cpu()  # [T, 256]
            if self._uses_c:
                assert ctx.instruction_scores is not None
                c = ctx.instruction_scores[i].float().cpu().view(t, n)  # [T, 256]
            found = signals(token_scores=s, instruction_scores=c)
            alpha = auto_alpha(found["s_concentration"], found["c_concentration"]) if self._auto else self.cfg.alpha
            ctx.notes[i].update(alpha=alpha, **found)
            score = torch.zeros(t, n)  # [T, 256]
            if s is not None:
                score += (1 - alpha) * minmax(s)
            if c is not None:
                score += alpha * minmax(c)
            out.append(top_per_tile(score, tile_budgets(ctx, i, self.cfg)))
        return out

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "method": self.name, "ratio": c.ratio, "alpha": c.alpha, "vit_layer": c.vit_layer,
            "llm_layer": c.llm_layer, "tau": c.tau, "head_agg": c.head_agg, "instr_agg": c.instr_agg,
            "region_budgets": c.region_budgets, "use_token_score": c.use_token_score, "positions": c.positions,
        }
