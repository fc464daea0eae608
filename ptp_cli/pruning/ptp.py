"""Pyramid Token Pruning: region budgets from CLS similarity, then per-tile top-b of fused token/instruction scores."""

from __future__ import annotations

from typing import Any

import torch

from ptp_cli.pruning.adaptive import auto_alpha, signals
from ptp_cli.pruning.base import VisualContext
from ptp_cli.pruning.vitprune import TwoStage, availability_mask, note_stage1, stage2_budgets
from ptp_cli.settings import AUTO


def minmax(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row min-max normalisation to [0, 1]; a constant row becomes 0. x [T, n]. With ``mask`` [T, n], the
    range comes from the masked-in entries only (the others are not meaningful: set them aside after)."""
    lo = x.amin(-1, keepdim=True) if mask is None else x.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True) if mask is None else x.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
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


def _survivors(x: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The entries of x [T, 256] that survived stage 1 (all of x without stage 1)."""
    return x if x is None or mask is None else x[mask]


class PTP(TwoStage):
    """Score = (1 - alpha) * minmax(s) + alpha * minmax(c) per tile; keep the top b_i tokens of tile i.

    s is dropped (and the ViT read-out skipped) when alpha == 1 or ``use_token_score`` is off; the probe is
    skipped when alpha == 0. At ratio 0 nothing is scored and every token is kept.

    With alpha "auto", both scores are computed and each sample's alpha comes from ``adaptive.auto_alpha``; the
    ranking is then exactly that of the fixed alpha. Every ranked sample notes the alpha used and the
    concentration signals of the scores computed (``ctx.notes``).

    With ``vit_prune`` > 0 (stage 1, ``vitprune.py``), each tile first keeps its best blocks by s alone (layer L's
    CLS attention, computed before any drop) inside the ViT; the fusion above then ranks the survivors only.
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
        return self.cfg.vit_layer if self._uses_s or self.cfg.vit_prune > 0 else None  # stage 1 ranks by s

    def vit_select(self, ctx: VisualContext) -> list[torch.Tensor]:
        assert ctx.token_scores is not None
        return [top_per_tile(ctx.token_scores[i].float().cpu(), self.stage1_budgets(ctx, i))
                for i in range(len(ctx.tiles))]

    def probe_layer(self) -> int | None:
        return self.cfg.llm_layer if self._uses_c else None

    def instruction_aggregation(self) -> str:
        return self.cfg.instr_agg

    def select(self, ctx: VisualContext) -> list[torch.Tensor | None]:
        if self.cfg.ratio == 0:
            return [None] * len(ctx.tiles)
        n = ctx.tokens_per_tile
        note_stage1(ctx)
        out: list[torch.Tensor | None] = []
        for i, t in enumerate(ctx.tiles):
            mask = availability_mask(ctx, i)  # [T, 256] stage-1 survivors, or None
            s = c = None
            if self._uses_s:
                assert ctx.token_scores is not None
                s = ctx.token_scores[i].float().cpu()  # [T, 256]
            if self._uses_c:
                assert ctx.instruction_scores is not None
                c = ctx.instruction_scores[i].float().cpu().view(t, n)  # [T, 256]
            found = signals(token_scores=_survivors(s, mask), instruction_scores=_survivors(c, mask))
            alpha = auto_alpha(found["s_concentration"], found["c_concentration"]) if self._auto else self.cfg.alpha
            ctx.notes[i].update(alpha=alpha, **found)
            score = torch.zeros(t, n)  # [T, 256]
            if s is not None:
                score += (1 - alpha) * minmax(s, mask)
            if c is not None:
                score += alpha * minmax(c, mask)
            if mask is not None:  # only survivors may be chosen (each tile's budget fits under its survivors)
                score = score.masked_fill(~mask, float("-inf"))
            out.append(top_per_tile(score, stage2_budgets(ctx, i, self)))
        return out

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "method": self.name, "ratio": c.ratio, "alpha": c.alpha, "vit_layer": c.vit_layer,
            "llm_layer": c.llm_layer, "tau": c.tau, "head_agg": c.head_agg, "instr_agg": c.instr_agg,
            "region_budgets": c.region_budgets, "use_token_score": c.use_token_score, "positions": c.position_mode,
            **self.stage1_settings(),
        }
