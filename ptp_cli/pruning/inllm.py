"""In-LLM baselines: FastV, VTW and PyramidDrop, acting between decoder layers during prefill.

"After layer K" (1-based count, as the papers write it) is the engine's hook after 0-based layer K - 1: layers
0..K-1 see every token, layer K onward only the kept ones (with their original positions, in their own KV
caches), and the ranking comes from the attention of 0-based layer K - 1, recomputed from its q and k.
"""

from __future__ import annotations

from typing import Any

import torch

from ptp_cli.pruning.base import ConfiguredMethod, LayerState
from ptp_cli.pruning.scores import CHUNK_ELEMENTS, aggregate_heads, attention_rows


def received_attention(state: LayerState, *, head_agg: str) -> torch.Tensor:
    """Mean attention each key receives from all valid queries of the layer, [B, S]; rows in chunks."""
    b, hq, s, _ = state.q.shape
    keys = state.keys  # [B, Hkv, K, hd]
    k = keys.shape[2]
    rows = max(1, CHUNK_ELEMENTS // (b * hq * k))
    total = torch.zeros(b, k, device=state.q.device)  # [B, K] fp32
    for r0 in range(0, s, rows):
        r1 = min(s, r0 + rows)
        slots = torch.arange(r0, r1, device=state.q.device).expand(b, -1)  # [B, R]: prefill slot == row
        probs = aggregate_heads(attention_rows(state.q[:, :, r0:r1], keys, slots, state.valid), head_agg)
        total += (probs * state.valid[:, r0:r1, None]).sum(1)  # padding queries do not vote
    return total / state.valid.sum(-1, keepdim=True).clamp(min=1)


def last_token_attention(state: LayerState, *, head_agg: str) -> torch.Tensor:
    """Attention of each sample's last prompt token over the keys, [B, S]."""
    b = state.q.shape[0]
    q = state.q[torch.arange(b, device=state.q.device), :, state.last][:, :, None]  # [B, Hq, 1, hd]
    probs = attention_rows(q, state.keys, state.last[:, None], state.valid)  # [B, Hq, 1, K]
    return aggregate_heads(probs, head_agg)[:, 0]


def keep_top_visual(score: torch.Tensor, state: LayerState, keep: float) -> torch.Tensor:
    """Keep mask [B, S]: every valid non-visual token plus the top round(keep * n_b) visual tokens of row b
    (Python's round, as ``budgets.keep_count``).

    Ties go to the earlier token (stable sort); non-visual tokens are ranked last so they never take a place.
    """
    vis = state.visual & state.valid  # [B, S]
    counts = torch.tensor([round(keep * n) for n in vis.sum(-1).tolist()], device=score.device)
    ranked = torch.where(vis, -score.float(), torch.inf)  # ascending: best visual first
    order = torch.sort(ranked, dim=-1, stable=True).indices  # [B, S]
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)  # rank[b, s]: place of token s in row b
    top = rank < counts[:, None]
    return (state.valid & ~state.visual) | (vis & top)


class FastV(ConfiguredMethod):
    """After layer K_f, keep the (1 - ratio) visual tokens with the most mean attention received at layer K_f - 1."""

    name = "fastv"
    prunes_in_llm = True

    def drop_layers(self) -> frozenset[int]:
        return frozenset({self.cfg.fastv_layer - 1})

    def after_layer(self, state: LayerState) -> torch.Tensor | None:
        if self.cfg.ratio == 0:
            return None
        score = received_attention(state, head_agg=self.cfg.head_agg)
        return keep_top_visual(score, state, 1.0 - self.cfg.ratio)

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"method": self.name, "ratio": c.ratio, "fastv_layer": c.fastv_layer, "head_agg": c.head_agg}


class VTW(ConfiguredMethod):
    """Visual Token Withdrawal: no visual token after layer K_w (default half the layers)."""

    name = "vtw"
    uses_ratio = False
    prunes_in_llm = True

    def drop_layers(self) -> frozenset[int]:
        return frozenset({self.cfg.resolved_vtw_layer(self.model_cfg) - 1})

    def after_layer(self, state: LayerState) -> torch.Tensor | None:
        return state.valid & ~state.visual

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "vtw_layer": self.cfg.resolved_vtw_layer(self.model_cfg)}


class PyramidDrop(ConfiguredMethod):
    """After each stage layer, keep ``pdrop_keep`` of the remaining visual tokens, ranked by the last prompt
    token's attention at that layer."""

    name = "pdrop"
    uses_ratio = False  # pdrop_keep sets what each stage keeps
    prunes_in_llm = True

    def drop_layers(self) -> frozenset[int]:
        return frozenset(k - 1 for k in self.cfg.resolved_pdrop_layers(self.model_cfg))

    def after_layer(self, state: LayerState) -> torch.Tensor | None:
        score = last_token_attention(state, head_agg=self.cfg.head_agg)
        return keep_top_visual(score, state, self.cfg.pdrop_keep)

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "method": self.name, "pdrop_layers": list(c.resolved_pdrop_layers(self.model_cfg)),
            "pdrop_keep": c.pdrop_keep, "head_agg": c.head_agg,
        }
