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

CHUNK_ELEMENTS = 1 << 24  # attention probabilities held at once by a chunked read-out (64 MiB in fp32)


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


def attention_logits(
    q: torch.Tensor, keys: torch.Tensor, q_slots: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Causal attention logits of some query rows in fp32, keys a row may not see at -inf.

    q [B, Hq, R, hd] (RoPE applied), keys [B, Hkv, K, hd] (RoPE applied), q_slots [B, R] the key slot of each
    query (it sees slots <= its own), valid [B, K] real keys. Returns [B, Hq, R, K].
    The product runs in the model's dtype with query heads grouped onto their key head (GQA), so the keys
    are neither copied per query head nor up-cast; scaling and masking then work in place on the fresh block.
    """
    b, hq, r, hd = q.shape
    hkv, k = keys.shape[1], keys.shape[2]
    qg = q.reshape(b, hkv, (hq // hkv) * r, hd)  # query head h uses key head h // g
    logits = (qg @ keys.transpose(-1, -2)).float().view(b, hq, r, k).mul_(hd**-0.5)  # [B, Hq, R, K]
    k_slots = torch.arange(k, device=q.device)[None, None, :]
    hidden = (k_slots > q_slots[:, :, None]) | ~valid[:, None, :]  # [B, R, K]
    hidden &= k_slots != q_slots[:, :, None]  # a row always sees itself: never an empty row
    return logits.masked_fill_(hidden[:, None], float("-inf"))


def attention_rows(
    q: torch.Tensor, keys: torch.Tensor, q_slots: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Causal attention probabilities of some query rows (``attention_logits``' arguments), softmax in fp32:
    [B, Hq, R, K]."""
    return attention_logits(q, keys, q_slots, valid).softmax(-1)


def attention_columns(
    q: torch.Tensor, keys: torch.Tensor, q_slots: torch.Tensor, valid: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """The probabilities of ``attention_rows`` at some key slots only, columns [B, C] -> [B, Hq, R, C].

    Each row's normaliser still runs over every key it sees (a log-sum-exp), but only the columns asked for
    are exponentiated and kept: the probe of a long question needs a few visual columns of many rows.
    """
    logits = attention_logits(q, keys, q_slots, valid)  # [B, Hq, R, K]
    b, hq, r, _ = logits.shape
    picked = logits.gather(-1, columns[:, None, None, :].expand(b, hq, r, -1))  # [B, Hq, R, C]
    return picked.sub_(logits.logsumexp(-1, keepdim=True)).exp_()


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
    columns: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """PTP's instruction score of tokens: attention from the instruction tokens at LLM layer ``layer``.

    x [B, S, D] input embeddings (unpruned), positions/valid/instruction [B, S], columns [B, C] the slots to score
    (the visual tokens; None: every slot). Runs layers 0..layer-1, then only the q projection of the instruction
    rows and the k projection of all tokens at ``layer``. Returns [B, C] (heads reduced by ``head_agg``,
    instruction rows by ``instr_agg``). The instruction rows are taken a few at a time (about ``chunk_elements``
    logits at once), so memory grows linearly with S, however long the question.
    """
    h = lm.run_layers(x, positions, valid, end=layer)
    block = lm.layers[layer]
    hn = block.attention_norm(h)
    rows, real = gather_rows(instruction)  # [B, R]
    lengths = sequence_lengths(positions, valid)  # [B] RoPE scaling per row, from its own length (as run_layers)
    cos_k, sin_k = lm.rotary(positions, hn.dtype, lengths=lengths)
    k = apply_rope(block.attention.project_k(hn), cos_k, sin_k)  # [B, Hkv, S, hd]
    if instr_agg not in ("max", "mean"):
        raise ValueError(f"instruction aggregation must be 'max' or 'mean', not {instr_agg!r}")
    # Instruction rows in chunks, so memory is linear in the prompt's length: a question of thousands of
    # tokens would otherwise need an fp32 [B, Hq, R, S] block, quadratic in its length.
    b, s = instruction.shape
    if columns is None:
        columns = torch.arange(s, device=x.device).expand(b, -1)
    step = max(1, chunk_elements // (b * block.attention.num_heads * s))
    acc = torch.full(columns.shape, float("-inf") if instr_agg == "max" else 0.0, device=x.device)  # [B, C] fp32
    for r0 in range(0, rows.shape[1], step):
        chunk, chunk_real = rows[:, r0 : r0 + step], real[:, r0 : r0 + step]  # [B, r]
        hq = hn.gather(1, chunk[..., None].expand(-1, -1, hn.shape[-1]))  # [B, r, D]
        cos_q, sin_q = lm.rotary(positions.gather(1, chunk), hn.dtype, lengths=lengths)
        q = apply_rope(block.attention.project_q(hq), cos_q, sin_q)  # [B, Hq, r, hd]
        probs = aggregate_heads(attention_columns(q, k, chunk, valid, columns), head_agg)  # [B, r, C]
        if instr_agg == "max":
            acc = torch.maximum(acc, probs.masked_fill(~chunk_real[..., None], float("-inf")).amax(1))
        else:
            acc += (probs * chunk_real[..., None]).sum(1)
    if instr_agg == "max":
        return acc.clamp(min=0)
    return acc / real.sum(-1, keepdim=True).clamp(min=1)
