"""RoPE positions of a pruned prompt: contiguous (0..n-1, as if the image had given only the kept tokens) or
original (each kept token, and the text after the image, keeps the index it had in the unpruned prompt).

With ``original`` a pruned prompt's last position is the unpruned prompt's, so decoding continues from the
unpruned length and a length-dependent RoPE scaling (Phi-3's long factors, dynamic NTK) sees the length the row
reaches, as it would unpruned (``models/llm.sequence_lengths`` reads the largest position).
"""

from __future__ import annotations

import torch


def unpruned_positions(*, prompt_len: int, image_start: int, num_visual: int, kept: torch.Tensor) -> torch.Tensor:
    """The unpruned index of every token of a pruned prompt [S_i]: the text before the image, the kept visual
    tokens (kept [K], indices in [0, num_visual), sorted), the text after it. prompt_len: the unpruned length."""
    dev = kept.device
    return torch.cat([
        torch.arange(image_start, device=dev),
        image_start + kept,
        torch.arange(image_start + num_visual, prompt_len, device=dev),
    ])


def pad_positions(rows: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Right-pad per-row positions to valid's [B, S]; padding slots get 0 (they are never attended to)."""
    out = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def contiguous_positions(valid: torch.Tensor) -> torch.Tensor:
    """0..n_i-1 over each row's real tokens; valid [B, S] -> [B, S] (padding clamped to 0 at the start)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)
