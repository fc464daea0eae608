"""Analytic FLOPs per stage of InternVL inference: ViT, instruction probe, LLM prefill, LLM decode.

Conventions:
- 2 FLOPs per multiply-add (a Linear d_in -> d_out on n tokens costs 2*n*d_in*d_out). The paper's
  8.42 TFLOPs for InternVL2-2B is closer to a multiply-add count, so halve ours to compare.
  InternVL2-2B, 7 tiles (1792 visual tokens) + 64 text tokens, 16 generated tokens, no pruning:
  ViT 5.07 T (+ projector 0.045 T), prefill 5.94 T, decode (15 steps) 0.057 T, total 11.11
  TFLOPs (~5.56 T multiply-adds). PTP at ratio 0.5 (probe at layer 1, 20 instruction tokens):
  prefill 2.99 T, probe 0.26 T, total 8.41 TFLOPs.
- Counted: every matmul with its real widths (fused qkv, GQA k/v, SwiGLU gate/up/down, the
  patch-embedding conv, the projector's two Linears, the LM head) and the attention matmuls
  (QK^T and AV), which are quadratic in sequence length.
- Excluded as negligible or free: norms, activations, softmax, RoPE, biases, ViT layer-scale,
  residual adds, position embeddings, the token embedding lookup, pixel shuffle, and tokens padded
  in a batch (everything here is per sample).
- Attention: one (query, key) pair costs 2*H*hd for QK^T plus 2*H*hd for AV (H = query heads).
  The ViT is non-causal: 1025*1025 pairs per tile. LLM prefill is causal: the token at position p
  attends p + 1 keys, so n tokens make n(n+1)/2 pairs. With in-LLM pruning (FastV, VTW,
  PyramidDrop) the tokens dropped after a layer no longer enter later layers; a kept token keeps its
  original position but attends only its kept predecessors and itself, so a layer left with n
  tokens still has exactly n(n+1)/2 pairs.
- LM head: only positions whose logits are computed: the last prompt position in prefill (the
  first generated token) and one per decode step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _causal_pairs(n: int) -> int:
    """(query, key) pairs of causal attention over n tokens: token p attends p + 1 keys."""
    return n * (n + 1) // 2


# ViT and projector


def vit_flops(v: VisionConfig, *, num_tiles: int, layers: int | None = None) -> int:
    """Patch-embedding conv plus the first `layers` encoder blocks (None: all), for `num_tiles` tiles.

    Per tile: 1024 patches through the conv (3*14*14 -> C), then 1025 tokens (CLS + patches) per
    block: fused qkv C -> 3C, out proj C -> C, MLP C -> I -> C, and non-causal attention over 1025
    keys. The projector is separate (projector_flops).
    """
    layers = v.num_layers if layers is None else layers
    _check_nonneg(num_tiles=num_tiles, layers=layers)
    if layers > v.num_layers:
        raise ValueError(f"layers must be <= {v.num_layers}, got {layers}")
    patch_embed = 2 * v.num_patches * (3 * v.patch_size * v.patch_size) * v.hidden_size
    return num_tiles * (patch_embed + layers * _vit_layer_flops(v, v.num_patches + 1))


def _vit_layer_flops(v: VisionConfig, n: int) -> int:
    """One encoder block on one tile's n tokens: fused qkv, out proj, MLP, and non-causal attention (n x n)."""
    c = v.hidden_size
    return 2 * n * (c * 3 * c + c * c + 2 * c * v.intermediate_size) + 4 * v.num_heads * v.head_dim * n * n


def vit_pruned_flops(v: VisionConfig, *, layer: int, kept_per_tile: list[int], patches_per_token: int = 4) -> int:
    """The ViT with stage-1 pruning (``--vit-prune``): every tile whole through layers 0..``layer``, then layers
    ``layer``+1.. on its CLS and the ``patches_per_token`` patches of each of its ``kept_per_tile`` tokens.
    Padding in a batch is not counted (as everywhere here: it is per sample)."""
    if not 0 <= layer < v.num_layers:
        raise ValueError(f"layer must be in [0, {v.num_layers - 1}], got {layer}")
    _check_nonneg(**{f"kept_per_tile[{t}]": k for t, k in enumerate(kept_per_tile)})
    rest = v.num_layers - layer - 1
    full = vit_flops(v, num_tiles=len(kept_per_tile), layers=layer + 1)
    return full + rest * sum(_vit_layer_flops(v, 1 + patches_per_token * k) for k in kept_per_tile)


def vit_score_flops(v: VisionConfig, *, num_tiles: int) -> int:
    """PTP's token score: the CLS row of QK^T at one ViT layer (1 query x 1025 keys), per tile.

    Counted apart from vit_flops because fused attention kernels never materialise the
    probabilities, so the row is recomputed from q and k (negligible: ~2M FLOPs a tile).
    """
    _check_nonneg(num_tiles=num_tiles)
    return num_tiles * 2 * (v.num_patches + 1) * v.num_heads * v.head_dim


def projector_flops(cfg: ModelConfig, *, num_tiles: int, tokens: int | None = None) -> int:
    """mlp1 on every tile's post-shuffle tokens (256 a tile; ``tokens`` in all when the ViT pruned some):
    Linear 4C -> D, then Linear D -> D."""
    _check_nonneg(num_tiles=num_tiles)
    d_in = cfg.vision.hidden_size * cfg.shuffle_factor**2
    d = cfg.llm.hidden_size
    return 2 * (num_tiles * cfg.tokens_per_tile if tokens is None else tokens) * (d_in * d + d * d)


# LLM


def _llm_linear_macs_per_token(llm: LLMConfig) -> int:
    """Multiply-adds of one decoder layer's Linears for one token (q, k, v, o, gate, up, down)."""
    d, q_width, kv_width = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    return d * q_width + 2 * d * kv_width + q_width * d + 3 * d * llm.intermediate_size


def lm_head_flops(llm: LLMConfig, *, positions: int) -> int:
    """LM head D -> V on `positions` tokens."""
    _check_nonneg(positions=positions)
    return 2 * positions * llm.hidden_size * llm.vocab_size


def llm_layer_flops(llm: LLMConfig, *, num_queries: int, keys_per_query_total: int) -> int:
    """One decoder layer: Linears for `num_queries` tokens + attention over that many (query, key) pairs."""
    _check_nonneg(num_queries=num_queries, keys_per_query_total=keys_per_query_total)
    linears = 2 * num_queries * _llm_linear_macs_per_token(llm)
    attention = 4 * llm.num_heads * llm.head_dim * keys_per_query_total
    return linears + attention


def _check_layers(llm: LLMConfig, lengths: list[int], name: str) -> None:
    if len(lengths) != llm.num_layers:
        raise ValueError(f"{name} needs one entry per LLM layer ({llm.num_layers}), got {len(lengths)}")
    if min(lengths, default=0) < 0:
        raise ValueError(f"{name} must be >= 0")


def prefill_flops(llm: LLMConfig, *, layer_lengths: list[int], lm_head_positions: int = 1) -> int:
    """One sample's prefill: layer j runs causal attention over `layer_lengths[j]` tokens.

    `lm_head_positions` is how many positions get logits (1: the last, which gives the first
    generated token; 0: no generation).
    """
    _check_layers(llm, layer_lengths, "layer_lengths")
    body = sum(
        llm_layer_flops(llm, num_queries=n, keys_per_query_total=_causal_pairs(n)) for n in layer_lengths
    )
    return body + lm_head_flops(llm, positions=lm_head_positions)


def decode_flops(llm: LLMConfig, *, layer_cache_lengths: list[int], steps: int) -> int:
    """`steps` decode forwards, one token each, after the prefill.

    The first generated token comes from the prefill's logits, so n generated tokens take n - 1
    steps (the last token is never fed back). Step t (0-based) feeds generated token t; at layer j
    the cache then holds `layer_cache_lengths[j] + t` entries (the prefill's layer length plus the
    earlier steps) and the new token attends those plus itself: layer_cache_lengths[j] + t + 1
    keys. Each step also runs the LM head once.
    """
    _check_layers(llm, layer_cache_lengths, "layer_cache_lengths")
    _check_nonneg(steps=steps)
    # sum_{t<steps} (c + t + 1) = steps*c + steps(steps+1)/2
    pairs = sum(steps * c + _causal_pairs(steps) for c in layer_cache_lengths)
    per_step_linears = llm.num_layers * 2 * _llm_linear_macs_per_token(llm)
    attention = 4 * llm.num_heads * llm.head_dim * pairs
    return steps * per_step_linears + attention + lm_head_flops(llm, positions=steps)


def probe_flops(llm: LLMConfig, *, seq_len: int, llm_layer: int, num_instruction_tokens: int) -> int:
    """PTP's instruction probe on the unpruned sequence of `seq_len` tokens, scoring at layer M = `llm_layer`.

    Layers 0..M-1 run in full (causal prefill over seq_len tokens). Layer M runs only its input
    norm (not counted), the q projection for the instruction rows, the k projection for all
    seq_len tokens, and QK^T for the instruction rows against their causal keys (no v, AV, o or
    MLP). The instruction tokens are taken as the last `num_instruction_tokens` positions (the
    question ends the prompt but for a few template tokens), so row i from the end attends
    seq_len - i keys: a slight over-count.
    """
    _check_nonneg(seq_len=seq_len, llm_layer=llm_layer, num_instruction_tokens=num_instruction_tokens)
    if llm_layer >= llm.num_layers:
        raise ValueError(f"llm_layer must be < {llm.num_layers}, got {llm_layer}")
    if num_instruction_tokens > seq_len:
        raise ValueError("num_instruction_tokens must be <= seq_len")
    full = llm_layer * llm_layer_flops(llm, num_queries=seq_len, keys_per_query_total=_causal_pairs(seq_len))
    q_width, kv_width = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    q_proj = 2 * num_instruction_tokens * llm.hidden_size * q_width
    k_proj = 2 * seq_len * llm.hidden_size * kv_width
    q_count = num_instruction_tokens
    pairs = q_count * seq_len - q_count * (q_count - 1) // 2  # sum_{i<Q} (seq_len - i)
    scores = 2 * llm.num_heads * llm.head_dim * pairs
    return full + q_proj + k_proj + scores


# One sample


@dataclass(frozen=True)
class StageFlops:
    """FLOPs of one sample, by stage (2 FLOPs per multiply-add)."""

    vit: int  # vision tower: ViT + projector (+ PTP's CLS-row token scores)
    probe: int  # PTP's instruction probe (0 without one)
    prefill: int  # LLM prefill, with the LM head on the last position
    decode: int  # LLM decode steps after the first generated token

    @property
    def total(self) -> int:
        return self.vit + self.probe + self.prefill + self.decode

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def sample_flops(
    cfg: ModelConfig,
    *,
    num_tiles: int,
    text_tokens: int,
    kept_visual: int,
    generated: int,
    probe: tuple[int, int] | None = None,
    layer_lengths: list[int] | None = None,
    vit_score: bool = False,
    vit_kept: tuple[int, list[int]] | None = None,
) -> StageFlops:
    """FLOPs of one sample.

    text_tokens: every non-visual prompt token (template, <img></img>, question).
    kept_visual: visual tokens entering the LLM (all 256*num_tiles without pre-LLM pruning).
    generated: tokens generated (0: no LM head at all; n > 0: prefill logits + n - 1 decode steps).
    probe: (llm_layer, num_instruction_tokens) of PTP's probe, run on the unpruned sequence.
    layer_lengths: per-layer token counts for in-LLM pruning; default text_tokens + kept_visual everywhere.
    vit_score: add PTP's CLS-row token scores (vit_score_flops).
    vit_kept: (layer L, tokens kept per tile) of pruning inside the ViT (vit_pruned_flops); the projector and the
    probe then see those tokens only. Without it the projector runs on every tile's 256 tokens, whatever is kept.
    """
    _check_nonneg(text_tokens=text_tokens, kept_visual=kept_visual, generated=generated)
    if layer_lengths is None:
        layer_lengths = [text_tokens + kept_visual] * cfg.llm.num_layers
    survivors = num_tiles * cfg.tokens_per_tile if vit_kept is None else sum(vit_kept[1])
    if vit_kept is None:
        vit = vit_flops(cfg.vision, num_tiles=num_tiles)
    else:
        vit = vit_pruned_flops(cfg.vision, layer=vit_kept[0], kept_per_tile=vit_kept[1],
                               patches_per_token=cfg.shuffle_factor**2)
    vit += projector_flops(cfg, num_tiles=num_tiles, tokens=survivors)
    if vit_score:
        vit += vit_score_flops(cfg.vision, num_tiles=num_tiles)
    probe_cost = 0
    if probe is not None:
        llm_layer, num_instruction = probe
        seq_len = text_tokens + survivors
        probe_cost = probe_flops(
            cfg.llm, seq_len=seq_len, llm_layer=llm_layer, num_instruction_tokens=num_instruction
        )
    return StageFlops(
        vit=vit,
        probe=probe_cost,
        prefill=prefill_flops(cfg.llm, layer_lengths=layer_lengths, lm_head_positions=min(generated, 1)),
        decode=decode_flops(cfg.llm, layer_cache_lengths=layer_lengths, steps=max(generated - 1, 0)),
    )
