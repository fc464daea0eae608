"""Training-only read-outs and attention probes of ptp-mini's stage 2 (``training.train``): linear heads
that ask a hidden state to hold what a guide wants there, and the attention of chosen rows and heads of one LLM
layer, computed as the inference modules compute it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptp_cli.models.llm import apply_rope
from ptp_cli.pruning.scores import attention_rows
from ptp_cli.synth.scene import COLOURS, COUNTS, GLYPHS, SHAPES
from training.data import IGNORE, TOKEN_GRID


class CarryHeads(nn.Module):
    """Training-only read-outs of a naming token's hidden state: the named object's colour, shape, glyph and
    place on the canvas, and how many objects the phrase names."""

    def __init__(self, width: int, place_bins: int = 16, *, token_place: bool = False,
                 route_place: bool = False, route_count: bool = False) -> None:
        super().__init__()
        self.bins = place_bins
        self.colour = nn.Linear(width, len(COLOURS))
        self.shape = nn.Linear(width, len(SHAPES))
        self.glyph = nn.Linear(width, len(GLYPHS))
        self.place = nn.Linear(width, 2 * place_bins)  # column bin, then row bin
        self.count = nn.Linear(width, len(COUNTS))
        # Created only when their losses are on, so runs without them draw every other weight as before.
        self.token_place = nn.Linear(width, 2 * TOKEN_GRID) if token_place else None  # a visual token's row, column
        # one read-out per routing head: its contribution to the answer position -> that object's place bins
        self.route_place = nn.ModuleList(nn.Linear(width, 2 * place_bins) for _ in range(2)) if route_place else None
        self.route_count = nn.Linear(width, len(COUNTS)) if route_count else None  # the count head's contribution -> count

    @classmethod
    def for_run(cls, width: int, cfg: Any) -> CarryHeads:
        """The read-outs a run with ``cfg`` (a ``TrainConfig``) trains (and saves in its checkpoint)."""
        return cls(width, cfg.place_bins, token_place=cfg.token_place_weight > 0,
                   route_place=cfg.route_place_weight > 0, route_count=cfg.route_count_weight > 0)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """h [R, D] hidden states, targets [R, 3] classes (glyph IGNORE where there is none)."""
        h = F.rms_norm(h, (h.shape[-1],))
        total = F.cross_entropy(self.colour(h), targets[:, 0]) + F.cross_entropy(self.shape(h), targets[:, 1])
        if (targets[:, 2] != IGNORE).any():
            total = total + F.cross_entropy(self.glyph(h), targets[:, 2], ignore_index=IGNORE)
        return total

    def place_loss(self, h: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """h [R, D] hidden states, places [R, 2] centres as fractions of the canvas (x, y)."""
        bins = (places * self.bins).long().clamp(0, self.bins - 1)  # [R, 2]
        logits = self.place(F.rms_norm(h, (h.shape[-1],))).unflatten(-1, (2, self.bins))  # [R, 2, B]
        return F.cross_entropy(logits.flatten(0, 1), bins.flatten())

    def token_place_loss(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """h [R, D] hidden states of visual tokens at ``index`` [R] within their view (row * 16 + column)."""
        assert self.token_place is not None
        logits = self.token_place(F.rms_norm(h, (h.shape[-1],)))  # [R, 32]
        return (F.cross_entropy(logits[:, :TOKEN_GRID], index // TOKEN_GRID)
                + F.cross_entropy(logits[:, TOKEN_GRID:], index % TOKEN_GRID))

    def route_place_loss(self, head: int, out: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """out [R, D] routing head ``head``'s contribution at answer rows, places [R, 2] (x, y fractions)."""
        assert self.route_place is not None
        bins = (places * self.bins).long().clamp(0, self.bins - 1)  # [R, 2]
        logits = self.route_place[head](out).unflatten(-1, (2, self.bins))  # [R, 2, B]
        return F.cross_entropy(logits.flatten(0, 1), bins.flatten())

    def route_count_loss(self, out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """out [R, D] the count head's contribution at answer rows, counts [R] objects the questions name."""
        assert self.route_count is not None
        return F.cross_entropy(self.route_count(out), counts.clamp(max=len(COUNTS) - 1))

    def count_loss(self, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """h [R, D] hidden states, counts [R] objects named (clamped to the largest countable answer)."""
        logits = self.count(F.rms_norm(h, (h.shape[-1],)))
        return F.cross_entropy(logits, counts.clamp(max=len(COUNTS) - 1))


def _attention(lm, h: torch.Tensor, positions: torch.Tensor, rows: list[int], layer: int) -> torch.Tensor:
    """Attention probabilities [Hq, R, S] of query ``rows`` at LLM ``layer`` (h [1, S, D] its input)."""
    block = lm.layers[layer]
    hn = block.attention_norm(h)  # [1, S, D]
    q_rows = torch.tensor(rows)[None]  # [1, R]
    lengths = torch.tensor([h.shape[1]])  # [1]: RoPE scaling as for the whole sequence
    cos_q, sin_q = lm.rotary(q_rows, hn.dtype, lengths=lengths)
    cos_k, sin_k = lm.rotary(positions, hn.dtype, lengths=lengths)
    q = apply_rope(block.attention.project_q(hn[:, q_rows[0]]), cos_q, sin_q)  # [1, Hq, R, hd]
    k = apply_rope(block.attention.project_k(hn), cos_k, sin_k)  # [1, Hkv, S, hd]
    return attention_rows(q, k, q_rows, torch.ones(1, h.shape[1], dtype=torch.bool))[0]  # [Hq, R, S]


def head_outputs(lm, h: torch.Tensor, positions: torch.Tensor, rows: list[int], layer: int, heads: list[int]
                 ) -> torch.Tensor:
    """What each of ``heads`` adds to the residual stream at query ``rows`` of LLM ``layer``: [len(heads), R, D]
    (its attention-weighted values through its slice of the output projection; h [1, S, D] the layer's input)."""
    att = lm.layers[layer].attention
    probs = _attention(lm, h, positions, rows, layer)  # [Hq, R, S]
    hn = lm.layers[layer].attention_norm(h)[0]  # [S, D]
    sl = slice(att.q_size + att.kv_size, att.q_size + 2 * att.kv_size)
    bias = att.wqkv.bias[sl] if att.wqkv.bias is not None else None
    v = F.linear(hn, att.wqkv.weight[sl], bias).unflatten(-1, (att.num_kv_heads, att.head_dim))  # [S, Hkv, hd]
    group = att.num_heads // att.num_kv_heads
    outs = []
    for i in heads:
        ctx = probs[i] @ v[:, i // group]  # [R, hd]
        outs.append(ctx @ att.wo.weight[:, i * att.head_dim:(i + 1) * att.head_dim].T)  # [R, D]
    return torch.stack(outs)


def attention_loss(
    lm, h: torch.Tensor, positions: torch.Tensor, rows: list[int], targets: list[torch.Tensor], *, layer: int,
    head: int | None = None,
) -> torch.Tensor:
    """-log of the attention mass each query row puts on its target positions at LLM ``layer`` (mean over
    heads, or one ``head``); h [1, S, D] is that layer's input, targets[i] [K_i] positions for rows[i]."""
    probs = _attention(lm, h, positions, rows, layer)  # [Hq, R, S]
    probs = probs.mean(0) if head is None else probs[head]  # [R, S]
    mass = torch.stack([probs[i, t].sum() for i, t in enumerate(targets)])
    return -(mass + 1e-6).log().mean()
