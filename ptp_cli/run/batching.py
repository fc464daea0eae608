"""Batch tensor helpers of the engine: right-padding ragged rows, and compacting each row's kept tokens."""

from __future__ import annotations

import torch


def right_pad(rows: list[torch.Tensor], length: int, value) -> torch.Tensor:
    """Stack 1-D (or [S, D]) tensors right-padded to ``length``.

    Right padding keeps prefill exactly causal for every real token (padding comes after it), so attention
    needs no mask there and SDPA can use its fastest kernels.
    """
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def compact(keep: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Gather each row's kept positions into a shorter right-padded batch. keep: [B, S]."""
    b, s = keep.shape
    width = int(keep.sum(-1).max())
    dest = keep.long().cumsum(-1) - 1  # [B, S] destination slot of every kept token, in original order
    rows = torch.arange(b, device=keep.device)[:, None].expand(b, s)
    out = []
    for t in tensors:
        o = t.new_zeros((b, width, *t.shape[2:]))
        o[rows[keep], dest[keep]] = t[keep]
        out.append(o)
    return out
