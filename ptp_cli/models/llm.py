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


def _freq_shape(hd: int) -> torch.Tensor:
    """Exponents 2i/hd [hd/2], as the reference computes them (int64 arange, then float32)."""
    return torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd


@dataclass(frozen=True)
class RopeTables:
    """Everything RoPE needs, precomputed on the CPU from the checkpoint's rope_scaling.

    Position-dependent scalings choose frequencies from a sequence's length ``L`` (its largest position + 1, the
    reference's ``max(position_ids) + 1`` for that sequence alone): Phi-3's longrope uses ``long_inv_freq`` once
    ``L > threshold`` (``original_max_position_embeddings``) and ``inv_freq`` up to it; dynamic NTK rescales the
    base for ``L > threshold`` (``max_position_embeddings``). Every other scaling has one table.
    """

    inv_freq: torch.Tensor  # [hd/2] frequencies (longrope: short factors; dynamic: within the trained context)
    head_dim: int  # hd
    theta: float  # RoPE base (dynamic NTK rescales it per length)
    scale: float = 1.0  # multiplies cos and sin (longrope's attention factor)
    long_inv_freq: torch.Tensor | None = None  # [hd/2] longrope's frequencies for sequences longer than threshold
    threshold: int | None = None  # longest sequence that keeps inv_freq (None: every length does)
    ntk_factor: float | None = None  # dynamic NTK's factor (None: not dynamic)


def rope_tables(cfg: LLMConfig) -> RopeTables:
    """The RoPE tables of a checkpoint, following transformers' rope initialisers for each rope_scaling type."""
    hd, theta = cfg.head_dim, cfg.rope_theta
    inv = 1.0 / (theta ** _freq_shape(hd))
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return RopeTables(inv_freq=inv, theta=theta, head_dim=hd)
    if kind == "linear":
        return RopeTables(inv_freq=inv / float(scaling["factor"]), theta=theta, head_dim=hd)
    if kind == "dynamic":
        return RopeTables(inv_freq=inv, head_dim=hd, theta=theta, threshold=cfg.max_position_embeddings,
                          ntk_factor=float(scaling["factor"]))
    if kind in ("longrope", "su"):
        original = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        factor = scaling.get("factor") or cfg.max_position_embeddings / original
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

        def table(factors: list[float]) -> torch.Tensor:
            return 1.0 / (torch.tensor(factors, dtype=torch.float32, device="cpu") * theta ** _freq_shape(hd))

        return RopeTables(inv_freq=table(scaling["short_factor"]), long_inv_freq=table(scaling["long_factor"]),
                          threshold=original, scale=float(attn), theta=theta, head_dim=hd)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old / low) & (wavelen >= old / high)
        return RopeTables(inv_freq=torch.where(is_mid, mid, scaled), theta=theta, head_dim=hd)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def sequence_lengths(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each row's length as RoPE scaling sees it: its largest real position + 1. positions/valid [B, S] -> [B]."""
    return positions.masked_fill(~valid, -1).amax(-1) + 1


class Rotary:
    """cos/sin for arbitrary per-token positions, with frequencies chosen per row from that row's own length.

    Every row is treated as the reference treats that sequence alone, so a row's numbers never depend on its
    batch-mates; the caller passes each row's length for this forward pass (prefill: its prompt; a decoding step:
    its length with the new token), so keys already cached keep the frequencies they were rotated with. Holds no
    module tensors (a model built on the meta device needs nothing rebuilt): the tables are copied once per device.
    """

    def __init__(self, cfg: LLMConfig) -> None:
        self.tables = rope_tables(cfg)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if device not in self._on_device:
            t = self.tables
            long = t.long_inv_freq.to(device) if t.long_inv_freq is not None else None
            self._on_device[device] = (t.inv_freq.to(device), _freq_shape(t.head_dim).to(device), long)
        return self._on_device[device]

    def inv_freq(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frequencies [B, hd/2] for rows of the given lengths [B] (a select between precomputed tables)."""
        t = self.tables
        inv, shape, long = self._device_tables(lengths.device)
        if t.threshold is None:
            return inv.expand(lengths.shape[0], -1)
        past = (lengths > t.threshold)[:, None]  # [B, 1]
        if long is not None:
            return torch.where(past, long, inv)
        # Dynamic NTK: the base grows with the row's length (float32, as the reference computes it).
        f = t.ntk_factor
        hd = t.head_dim
        base = t.theta * ((f * lengths.float() / t.threshold) - (f - 1)) ** (hd / (hd - 2))  # [B]
        return torch.where(past, 1.0 / (base[:, None] ** shape), inv)

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype, *, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S], lengths [B] -> cos, sin [B, 1, S, hd]."""
        freqs = positions.float()[..., None] * self.inv_freq(lengths)[:, None, :]  # [B, S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        s = self.tables.scale
        return (emb.cos() * s).to(dtype)[:, None], (emb.sin() * s).to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------- KV cache


class LayerCache:
    """One layer's keys and values, preallocated [B, Hkv, capacity, hd] and written by index.

    ``valid`` [B, capacity] marks slots that hold real tokens (False for padding), so attention
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


def grouped_sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, *,
    causal: bool, repeat_kv: bool,
) -> torch.Tensor:
    """SDPA for q [B, Hq, S, hd] against keys/values [B, Hkv, K, hd] (Hkv divides Hq); returns [B, Hq, S, hd].

    ``repeat_kv`` copies the key/value heads up to Hq instead of passing ``enable_gqa``: not every CUDA kernel
    takes enable_gqa (the masked memory-efficient one does not), and full heads beat a fall-back to the math
    kernel there. The engine sets it on CUDA; both ways compute the same attention.
    """
    g = q.shape[1] // keys.shape[1]
    if g > 1 and repeat_kv:
        keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=g > 1 and not repeat_kv
    )


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
        out = grouped_sdpa(q, keys, values, mask, causal=causal, repeat_kv=h.is_cuda)  # [B, Hq, S, hd]
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
        self.generates = True  # False once keep_layers dropped layers: only the first ones can run

    def keep_layers(self, n: int) -> None:
        """Free the decoder layers from ``n`` on, for a caller that runs only the first ``n`` (under
        ``--engine vllm`` ptp runs at most the instruction probe; vLLM holds the whole LLM). Generation is then
        refused rather than run through a truncated model."""
        if n < len(self.layers):
            self.layers = self.layers[:n]
            self.generates = False

    def new_cache(self, batch: int, capacity: int, *, dtype=None, device=None) -> LayerCache:
        if not self.generates:  # every generation path starts with a cache
            raise RuntimeError(f"this LLM keeps only its first {len(self.layers)} layers (keep_layers): it "
                               "cannot generate")
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
        cos, sin = self.rotary(positions, x.dtype, lengths=sequence_lengths(positions, valid))
        causal = right_padded(valid)
        mask = None if causal else attention_mask(valid, 0, x.shape[1])
        for layer in self.layers[:end]:
            x = layer(x, cos, sin, None, valid, mask, causal=causal).hidden
        return x
