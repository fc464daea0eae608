"""Attention read-outs that pruning methods need, computed from the rows that are needed only.

The models expose narrow probes only (the ViT's per-head CLS attention row at one layer, an LLM block's
``project_q`` / ``project_k``); every reduction over heads, tokens or instruction rows happens here.
Nothing here materialises a layer's full attention matrix or switches the model to eager attention:
the rows asked for (a few queries against all keys) are recomputed from q and k.
"""

from __future__ import annotations

import torch

from ptp_cli.config import ModelConfig
from ptp_cli.models.internvl import pool_patch_scores
from ptp_cli.models.llm import LLM, apply_rope, sequence_lengths


def aggregate_heads(probs: torch.Tensor, how: str, dim: int = 1) -> torch.Tensor:
    """Mean or max over the head dimension of attention probabilities."""
    if how == "mean":
        return probs.mean(dim)
    if how == "max":
        return probs.amax(dim)
    raise ValueError(f"head aggregation must be 'mean' or 'max', not {how!r}")


def vit_token_scores(cls_attn: torch.Tensor, *, head_agg: str, model_cfg: ModelConfig) -> torch.Tensor:
    """PTP's token score s: the ViT's CLS -> patch attention [T, H, P] reduced over heads, then each visual
    token's f x f patches summed (in the model's token order) -> [T, 256]."""
    row = aggregate_heads(cls_attn, head_agg)  # [T, P]
    return pool_patch_scores(row, factor=model_cfg.shuffle_factor, version=model_cfg.ps_version)


def attention_rows(
    q: torch.Tensor, keys: torch.Tensor, q_slots: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Causal attention probabilities of some query rows; softmax in fp32.

    q [B, Hq, R, hd] (RoPE applied), keys [B, Hkv, K, hd] (RoPE applied), q_slots [B, R] the key slot of each
    query (it sees slots <= its own), valid [B, K] real keys. Returns [B, Hq, R, K].
    The product runs in the model's dtype with query heads grouped onto their key head (GQA), so the keys
    are neither copied per query head nor up-cast.
    """
    b, hq, r, hd = q.shape
    hkv, k = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, hkv, (hq // hkv) * r, hd)  # query head h uses key head h // g
    logits = (qg @ keys.transpose(-1, -2)).float().view(b, hq, r, k) * hd**-0.5  # [B, Hq, R, K]
    k_slots = torch.arange(k, device=q.device)
    allowed = (k_slots[None, None, :] <= q_slots[:, :, None]) & valid[:, None, :]  # [B, R, K]
    allowed = allowed | (k_slots[None, None, :] == q_slots[:, :, None])  # never an empty row
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)


def gather_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, R] of the True entries of mask [B, S] (R = most per row), and which are real [B, R]."""
    counts = mask.sum(-1)
    r = max(int(counts.max()), 1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :r]  # True positions first
    real = torch.arange(r, device=mask.device)[None, :] < counts[:, None]
    return order, real


@torch.inference_mode()
def instruction_scores(
    lm: LLM,
    x: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    instruction: torch.Tensor,
    *,
    layer: int,
    head_agg: str = "mean",
    instr_agg: str = "max",
) -> torch.Tensor:
    """PTP's instruction score of every token: attention from the instruction tokens at LLM layer ``layer``.

    x [B, S, D] input embeddings (unpruned), positions/valid/instruction [B, S]. Runs layers 0..layer-1,
    then only the q projection of the instruction rows and the k projection of all tokens at ``layer``.
    Returns [B, S] (heads reduced by ``head_agg``, instruction rows by ``instr_agg``).
    """
    h = lm.run_layers(x, positions, valid, end=layer)  # [B, S, D]
    block = lm.layers[layer]
    hn = block.attention_norm(h)
    rows, real = gather_rows(instruction)  # [B, R]
    hq = hn.gather(1, rows[..., None].expand(-1, -1, hn.shape[-1]))  # [B, R, D]
    lengths = sequence_lengths(positions, valid)  # [B] RoPE scaling per row, from its own length (as run_layers)
    cos_q, sin_q = lm.rotary(positions.gather(1, rows), hn.dtype, lengths=lengths)
    cos_k, sin_k = lm.rotary(positions, hn.dtype, lengths=lengths)
    q = apply_rope(block.attention.project_q(hq), cos_q, sin_q)  # [B, Hq, R, hd]
    k = apply_rope(block.attention.project_k(hn), cos_k, sin_k)  # [B, Hkv, S, hd]
    probs = aggregate_heads(attention_rows(q, k, rows, valid), head_agg)  # [B, R, S]
    if instr_agg == "max":
        return probs.masked_fill(~real[..., None], float("-inf")).amax(1).clamp(min=0)
    if instr_agg == "mean":
        return (probs * real[..., None]).sum(1) / real.sum(-1, keepdim=True).clamp(min=1)
    raise ValueError(f"instruction aggregation must be 'max' or 'mean', not {instr_agg!r}")
