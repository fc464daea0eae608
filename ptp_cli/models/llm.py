"""A compact decoder-only LLM covering InternVL2's backbones (InternLM2, Qwen2, Llama, Phi-3).

All four are the same network: pre-norm RMSNorm, RoPE (rotate-half), GQA attention with a fused
q|k|v projection, SwiGLU MLP with a fused gate|up projection. Checkpoint quirks (InternLM2's grouped
wqkv, Phi-3's fused projections, Qwen2's qkv bias) are resolved once, at load (``ptp_cli.loading.weights``).

The caller drives the layers one by one (``embed`` -> ``layers[j]`` -> ``logits``), so it can read
q and k inside any layer and drop tokens between layers; each layer owns its KV cache, so a layer
that saw fewer tokens keeps a shorter cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptp_cli.config import LLMConfig
from ptp_cli.models.vit import RMSNorm

# ---------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: LLMConfig, *, max_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [hd/2] and the attention scale applied to cos/sin, from the checkpoint's rope_scaling.

    ``max_len`` is the longest sequence the batch will reach; Phi-3's longrope picks its long factors past the
    original context (as the reference does once the sequence grows that long).
    """
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv, 1.0
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "dynamic":
        # Dynamic NTK only changes anything past the trained context (InternLM2's 32k); prompts here are shorter.
        if max_len <= cfg.max_position_embeddings:
            return inv, 1.0
        factor = float(scaling["factor"])
        base = cfg.rope_theta * (
            (factor * max_len / cfg.max_position_embeddings) - (factor - 1)
        ) ** (hd / (hd - 2))
        return 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd)), 1.0
    if kind in ("longrope", "su"):
        original = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        factors = scaling["long_factor"] if max_len > original else scaling["short_factor"]
        ext = torch.tensor(factors, dtype=torch.float32, device="cpu")
        factor = scaling.get("factor") or cfg.max_position_embeddings / original
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return inv / ext, float(attn)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old / low) & (wavelen >= old / high)
        return torch.where(is_mid, mid, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class Rotary:
    """cos/sin for arbitrary per-token positions (left padding and dropped tokens keep their own positions).

    Holds no tensors of the module's own (so a model built on the meta device needs nothing rebuilt): the
    frequencies are computed on the CPU and copied once per device.
    """

    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg
        self.prepare(0)

    def prepare(self, max_len: int) -> None:
        """Pick the frequencies for a batch that will reach ``max_len`` tokens."""
        self.inv_freq, self.scale = rope_inv_freq(self.cfg, max_len=max_len)  # [hd/2] on CPU
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, S] -> cos, sin [B, 1, S, hd]
        inv = self._on_device.get(positions.device)
        if inv is None:
            inv = self._on_device[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv  # [B, S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype)[:, None], (emb.sin() * self.scale).to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------- KV cache


class LayerCache:
    """One layer's keys and values, preallocated [B, Hkv, capacity, hd] and written by index.

    ``valid`` [B, capacity] marks slots that hold real tokens (False for left padding), so attention
    masks are built from it; ``length`` is the number of slots written (the same for every row).
    """

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, *, dtype, device) -> None:
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, S, hd] at the end; return the filled part of the cache."""
        s0, s1 = self.length, self.length + k.shape[2]
        if s1 > self.capacity:
            raise RuntimeError(f"KV cache overflow: {s1} > {self.capacity}")
        self.k[:, :, s0:s1] = k
        self.v[:, :, s0:s1] = v
        self.valid[:, s0:s1] = valid
        self.length = s1
        return self.k[:, :, :s1], self.v[:, :, :s1]


def attention_mask(valid_keys: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, K]: causal in slot order, invalid (padding) keys hidden.

    A padding query still sees itself, so no softmax row is empty (its output is never used).
    """
    k_len = valid_keys.shape[1]
    q_slots = torch.arange(q_start, q_start + q_len, device=valid_keys.device)[:, None]  # [q, 1]
    k_slots = torch.arange(k_len, device=valid_keys.device)[None, :]  # [1, K]
    causal = k_slots <= q_slots  # [q, K]
    return (causal & (valid_keys[:, None, :] | (k_slots == q_slots)))[:, None]  # [B, 1, q, K]


def right_padded(valid: torch.Tensor) -> bool:
    """Whether every row of valid [B, S] is real tokens followed only by padding (one device sync)."""
    return bool((valid[:, 1:] <= valid[:, :-1]).all())


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """One new query per row against the cache: q [B, Hq, 1, hd], keys/values [B, Hkv, K, hd], valid [B, K].

    Query heads are grouped onto their key head ([B, Hkv, g, hd] @ [B, Hkv, hd, K]), so the cache is read once
    and never copied to Hq heads -- decoding is bound by reading the cache. The last slot (the new token's own)
    is always valid, so no row is empty. Returns [B, Hq, 1, hd].
    """
    b, hq, _, hd = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, hd)  # query head h uses key head h // g
    scores = (qg @ keys.transpose(-1, -2)).float() * hd**-0.5  # [B, Hkv, g, K]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = scores.softmax(-1).to(values.dtype) @ values  # [B, Hkv, g, hd]
    return out.reshape(b, hq, 1, hd)


# ---------------------------------------------------------------------------------------------- modules


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.expand_kv: bool | None = None  # repeat k/v heads for SDPA (None: on CUDA only; see forward)

    def project_q(self, h: torch.Tensor) -> torch.Tensor:
        """Queries only (for probing a few rows): h [B, S, D] -> [B, Hq, S, hd], before RoPE."""
        w = self.wqkv.weight[: self.q_size]
        b = self.wqkv.bias[: self.q_size] if self.wqkv.bias is not None else None
        return F.linear(h, w, b).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_k(self, h: torch.Tensor) -> torch.Tensor:
        """Keys only: h [B, S, D] -> [B, Hkv, S, hd], before RoPE."""
        sl = slice(self.q_size, self.q_size + self.kv_size)
        w = self.wqkv.weight[sl]
        b = self.wqkv.bias[sl] if self.wqkv.bias is not None else None
        return F.linear(h, w, b).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None,
        valid: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, S, D] (normed) -> (output [B, S, D], q [B, Hq, S, hd], keys so far [B, Hkv, K, hd]).

        ``causal``: the cache is empty and padding, if any, is at the end of the rows (right padding), so a
        plain causal mask is exact for every real token -- SDPA then needs no mask tensor and may use its
        flash kernel. Otherwise ``mask`` [B, 1, S, K] (precomputed when many layers share it) or one built
        from the cache hides padding.
        """
        b, s, _ = h.shape
        q, k, v = self.wqkv(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, S, hd]
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # a pass that keeps nothing (the PTP probe, reference runs): attend to this step only
            start, keys, values = 0, k, v
        else:
            start = cache.length
            keys, values = cache.append(k, v, valid)  # [B, Hkv, K, hd]
        if s == 1 and cache is not None and mask is None and not causal:
            out = decode_attention(q, keys, values, cache.valid[:, : cache.length])
            return self.wo(out.transpose(1, 2).reshape(b, s, self.q_size)), q, keys
        if causal:
            if start:
                raise ValueError("causal=True needs an empty cache")
            mask = None
        elif mask is None:
            mask = attention_mask(valid if cache is None else cache.valid[:, : cache.length], start, s)
        k_att, v_att, gqa = keys, values, self.num_kv_heads != self.num_heads
        if gqa and (h.is_cuda if self.expand_kv is None else self.expand_kv):
            # Not every CUDA SDPA kernel takes enable_gqa (the masked memory-efficient one does not):
            # give it full heads rather than fall back to the math kernel.
            g = self.num_heads // self.num_kv_heads
            k_att, v_att, gqa = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1), False
        out = F.scaled_dot_product_attention(
            q, k_att, v_att, attn_mask=mask, is_causal=causal, enable_gqa=gqa
        )  # [B, Hq, S, hd]
        return self.wo(out.transpose(1, 2).reshape(b, s, self.q_size)), q, keys


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.intermediate, dim=-1)
        return self.w2(F.silu(gate) * up)


@dataclass
class LayerOutput:
    hidden: torch.Tensor  # [B, S, D] the layer's output
    q: torch.Tensor  # [B, Hq, S, hd] this step's queries, RoPE applied
    keys: torch.Tensor  # [B, Hkv, K, hd] every key the layer holds (cache included), RoPE applied


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self, x, cos, sin, cache: LayerCache | None, valid: torch.Tensor, mask: torch.Tensor | None = None,
        *, causal: bool = False,
    ) -> LayerOutput:
        a, q, keys = self.attention(self.attention_norm(x), cos, sin, cache, valid, mask, causal=causal)
        x = x + a
        x = x + self.feed_forward(self.ffn_norm(x))
        return LayerOutput(hidden=x, q=q, keys=keys)


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(cfg)

    def new_cache(self, batch: int, capacity: int, *, dtype=None, device=None) -> LayerCache:
        p = self.output.weight
        return LayerCache(
            batch, self.cfg.num_kv_heads, capacity, self.cfg.head_dim,
            dtype=dtype or p.dtype, device=device or p.device,
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32 (log-probabilities are reported to users)."""
        return self.output(self.norm(h)).float()

    def forward(
        self, ids: torch.Tensor, *, positions: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reference path: full-sequence logits [B, S, V] with a fresh cache (tests and the naive baselines)."""
        b, s = ids.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=ids.device)
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        return self.logits(self.run_layers(self.tok_embeddings(ids), positions, valid))

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, *, end: int | None = None
    ) -> torch.Tensor:
        """Hidden states after layers [0, end) on x [B, S, D], keeping no KV cache."""
        self.rotary.prepare(int(positions.max()) + 1)
        cos, sin = self.rotary(positions, x.dtype)
        causal = right_padded(valid)
        mask = None if causal else attention_mask(valid, 0, x.shape[1])
        for layer in self.layers[:end]:
            x = layer(x, cos, sin, None, valid, mask, causal=causal).hidden
        return x
