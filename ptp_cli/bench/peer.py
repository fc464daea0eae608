"""The peer: transformers' ``InternVLForConditionalGeneration.generate``, what a user would otherwise write.

It is built from a transformers config with the same sizes as the ptp model (InternLM2 is
Llama-architecture), on the device and in the dtype of the run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ptp_cli.bench.measurement import BenchRow, PeakMemory, Stat, timed
from ptp_cli.bench.workload import BenchModel
from ptp_cli.builders.writers import save_hf_layout
from ptp_cli.config import ModelConfig
from ptp_cli.run.engine import Request

PEER = "transformers"  # the peer row's name
SHARE_WEIGHTS_MAX_PARAMS = 50_000_000  # below this the peer gets ptp's own weights (via a temporary -hf copy)


def peer_config(cfg: ModelConfig, *, image_token_id: int) -> Any:
    """transformers' InternVLConfig with the same sizes as ``cfg``.

    RoPE scaling is left out: it changes no shape and no cost at these lengths.
    """
    from transformers import InternVLConfig, LlamaConfig, Phi3Config, Qwen2Config

    m, v = cfg.llm, cfg.vision
    common = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps, hidden_act=m.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if m.arch in ("internlm2", "llama"):
        text = LlamaConfig(**common, head_dim=m.head_dim, attention_bias=m.qkv_bias, mlp_bias=False)
    elif m.arch == "qwen2":
        text = Qwen2Config(**common, use_sliding_window=False)
    else:
        text = Phi3Config(**common, original_max_position_embeddings=m.max_position_embeddings)
    vision = dict(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, hidden_act=v.hidden_act, attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_norm, norm_type=v.norm_type, layer_norm_eps=v.norm_eps,
        image_size=[v.image_size, v.image_size], patch_size=[v.patch_size, v.patch_size],
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=cfg.tokens_per_tile, downsample_ratio=cfg.downsample_ratio,
        vision_feature_layer=cfg.select_layer, tie_word_embeddings=m.tie_word_embeddings,
    )


def build_peer(bench_model: BenchModel, *, dtype: torch.dtype, device: torch.device, share_weights: bool) -> Any:
    """The peer on ``device`` in ``dtype``: ptp's own weights (small models), else transformers' random init."""
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    config = peer_config(bench_model.cfg, image_token_id=bench_model.ids.image)
    with torch.device("meta"):
        peer = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    peer.to_empty(device=device)
    peer.initialize_weights()  # normal(0, 0.02) weights, and the non-persistent RoPE buffers
    if share_weights:
        with tempfile.TemporaryDirectory(prefix="ptp-bench-") as tmp:
            state = {k: v.float().cpu() for k, v in bench_model.model.state_dict().items()}
            save_hf_layout(state, bench_model.cfg, Path(tmp))
            loaded = load_file(str(Path(tmp) / "model.safetensors"))
        peer.load_state_dict({k: v.to(device, dtype) for k, v in loaded.items()}, strict=True)
    peer.tie_weights()
    return peer.eval().requires_grad_(False)


class PeerRunner:
    """transformers' generate on the requests as one left-padded batch; TTFT from a max_new_tokens=1 call."""

    name = PEER

    def __init__(self, peer: Any, requests: list[Request], *, pad: int, new_tokens: int, device: torch.device,
                 dtype: torch.dtype, own_weights: int, visual_tokens: int, flops_per_sample: dict[str, int]) -> None:
        s = max(len(r.ids) for r in requests)
        ids = torch.full((len(requests), s), pad, dtype=torch.long)  # [B, S]
        mask = torch.zeros(len(requests), s, dtype=torch.long)  # [B, S]
        for i, r in enumerate(requests):
            ids[i, s - len(r.ids) :] = torch.tensor(r.ids)
            mask[i, s - len(r.ids) :] = 1
        self.inputs = dict(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            pixel_values=torch.cat([r.pixel_values for r in requests]).to(device, dtype),  # [sum T, 3, 448, 448]
        )
        self.peer, self.pad, self.new_tokens, self.device = peer, pad, new_tokens, device
        self.visual_tokens = visual_tokens
        self.flops_per_sample = flops_per_sample
        self.memory = PeakMemory(device, own_weights)
        self.walls: list[float] = []
        self.ttfts: list[float] = []
        self.tokens: list[list[int]] = []

    def _generate(self, n: int) -> torch.Tensor:
        out = self.peer.generate(
            **self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.pad,
        )
        generated = out[:, self.inputs["input_ids"].shape[1] :]  # [B, n]
        if generated.shape[1] != n:
            raise RuntimeError(f"transformers generated {generated.shape[1]} tokens, expected {n}")
        return generated

    def warm(self) -> None:
        with self.memory:
            self._generate(1)
            self._generate(self.new_tokens)

    def measure(self) -> float:
        with self.memory:
            self.ttfts.append(timed(self.device, lambda: self._generate(1))[0])
            wall, tokens = timed(self.device, lambda: self._generate(self.new_tokens))
        self.walls.append(wall)
        self.tokens = tokens.tolist()
        return wall

    def row(self, *, matmul: float) -> BenchRow:
        b = len(self.tokens)
        return BenchRow(
            name=PEER, engine="transformers", method=None, ratio=None, settings={"attn_implementation": "sdpa"},
            samples_per_s=Stat.of([b / w for w in self.walls]), wall_s=Stat.of(self.walls),
            ttft_s=Stat.of(self.ttfts), stages_s={}, peak_memory_bytes=self.memory.peak,
            peak_memory_kind=self.memory.kind, visual_tokens=float(self.visual_tokens),
            visual_tokens_layer_mean=float(self.visual_tokens), visual_tokens_last_layer=float(self.visual_tokens),
            flops_per_sample=dict(self.flops_per_sample),
            prefill_tflops=None, prefill_pct_of_matmul=None,
        )
