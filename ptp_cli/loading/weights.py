"""Weights: the model's canonical tensors, how each layout stores them, and reading them from safetensors.

Every format quirk (InternLM2's grouped wqkv, split or fused q/k/v and gate/up, renamed ViT keys) is handled
here, once, by a table of ``Rule``s: each canonical tensor is made from one or more stored tensors (``merge``)
and back (``split``, used by ``ptp_cli.builders.writers``). The canonical names are those of
``InternVLModel.state_dict()``:

    language_model.layers.{i}.attention.wqkv   rows: all q heads | all k heads | all v heads
    language_model.layers.{i}.feed_forward.w13 rows: gate | up
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ptp_cli.config import LLMConfig, ModelConfig
from ptp_cli.errors import ModelLoadError
from ptp_cli.loading.files import HEAD_KEYS, Layout, detect_layout, few, open_weights, read_json
from ptp_cli.models.internvl import InternVLModel

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # stale buffers some older files carry
_TIED_HEAD = "language_model.output.weight"


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``InternVLModel(cfg).state_dict()`` (LM head omitted when tied), in the model's order.

    Read off the model itself, built on the meta device (no memory, no init), so it cannot drift from it.
    """
    with torch.device("meta"):
        model = InternVLModel(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.llm.tie_word_embeddings:
        shapes.pop(_TIED_HEAD, None)  # the embedding table, under a second name
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Conversion rules


def _first(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _single(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


@dataclass(frozen=True)
class Rule:
    """One canonical tensor = merge(stored tensors); stored tensors = split(canonical tensor)."""

    canonical: str
    sources: tuple[str, ...]
    merge: Callable[[list[torch.Tensor]], torch.Tensor] = _first
    split: Callable[[torch.Tensor], list[torch.Tensor]] = _single


def _same(canonical: str, source: str) -> Rule:
    return Rule(canonical, (source,))


def _rows(canonical: str, sources: tuple[str, ...], sizes: list[int]) -> Rule:
    """Canonical rows = the sources' rows stacked in order (fused q|k|v, gate|up)."""
    return Rule(canonical, sources, _cat, lambda t: list(t.split(sizes, dim=0)))


def _grouped_qkv(canonical: str, source: str, m: LLMConfig) -> Rule:
    """InternLM2's wqkv: rows [Hkv, g + 2, hd] (g q heads, then k, then v, per kv head) <-> q | k | v."""
    g, hkv, hd = m.num_heads // m.num_kv_heads, m.num_kv_heads, m.head_dim

    def merge(ts: list[torch.Tensor]) -> torch.Tensor:
        w = ts[0].unflatten(0, (hkv, g + 2, hd))  # [Hkv, g+2, hd, (D)]
        return torch.cat([w[:, :g].flatten(0, 2), w[:, g].flatten(0, 1), w[:, g + 1].flatten(0, 1)])

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = t.split([m.num_heads * hd, hkv * hd, hkv * hd])
        parts = [q.unflatten(0, (hkv, g, hd)), k.unflatten(0, (hkv, 1, hd)), v.unflatten(0, (hkv, 1, hd))]
        return [torch.cat(parts, dim=1).flatten(0, 2)]

    return Rule(canonical, (source,), merge, split)


# A ViT block's parameters (after "layers.{i}.") -> their -hf names (after "layer.{i}."); qkv is split apart.
_HF_VIT_RENAMES = (
    ("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."), ("attn.k_norm.", "attention.k_norm."), ("ls1", "lambda_1"),
    ("ls2", "lambda_2"), ("mlp.", "mlp."),
)


def _vision_rules(cfg: ModelConfig, layout: Layout) -> list[Rule]:
    names = [k for k in canonical_shapes(cfg) if k.startswith(("vision_model.", "mlp1."))]
    if layout == "original":
        return [_same(k, k) for k in names]
    v = cfg.vision
    c = v.hidden_size
    t, pj = "model.vision_tower.", "model.multi_modal_projector."
    rules = [
        _same("vision_model.embeddings.class_embedding", t + "embeddings.cls_token"),
        _same("vision_model.embeddings.patch_embedding.weight", t + "embeddings.patch_embeddings.projection.weight"),
        _same("vision_model.embeddings.patch_embedding.bias", t + "embeddings.patch_embeddings.projection.bias"),
        _same("vision_model.embeddings.position_embedding", t + "embeddings.position_embeddings"),
    ]
    for name in names:
        if not (block := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", name)):
            continue
        i, rest = block.groups()
        src = f"{t}encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            leaf = rest.removeprefix("attn.qkv.")
            rules.append(_rows(name, tuple(f"{src}attention.{p}_proj.{leaf}" for p in "qkv"), [c, c, c]))
            continue
        old, new = next((o, n) for o, n in _HF_VIT_RENAMES if rest.startswith(o))
        rules.append(_same(name, src + new + rest.removeprefix(old)))
    for idx, proj in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for leaf in ("weight", "bias"):
            rules.append(_same(f"mlp1.{idx}.{leaf}", f"{pj}{proj}.{leaf}"))
    return rules


def _llm_rules(cfg: ModelConfig, layout: Layout) -> list[Rule]:
    m = cfg.llm
    hd = m.head_dim
    sizes_qkv = [m.num_heads * hd, m.num_kv_heads * hd, m.num_kv_heads * hd]
    naming = m.arch if layout == "original" else ("llama" if m.arch == "internlm2" else m.arch)
    body, head = ("language_model.model.", "language_model.lm_head.weight")
    if layout == "hf":
        body, head = "model.language_model.", "lm_head.weight"
    rules: list[Rule] = []
    if naming == "internlm2":
        rules.append(_same("language_model.tok_embeddings.weight", body + "tok_embeddings.weight"))
        head = "language_model.output.weight"
    else:
        rules.append(_same("language_model.tok_embeddings.weight", body + "embed_tokens.weight"))
    for i in range(m.num_layers):
        c, s = f"language_model.layers.{i}.", f"{body}layers.{i}."
        if naming == "internlm2":
            rules += [
                _same(c + "attention_norm.weight", s + "attention_norm.weight"),
                _grouped_qkv(c + "attention.wqkv.weight", s + "attention.wqkv.weight", m),
                _same(c + "attention.wo.weight", s + "attention.wo.weight"),
                _same(c + "ffn_norm.weight", s + "ffn_norm.weight"),
                _rows(c + "feed_forward.w13.weight", (s + "feed_forward.w1.weight", s + "feed_forward.w3.weight"),
                      [m.intermediate_size] * 2),
                _same(c + "feed_forward.w2.weight", s + "feed_forward.w2.weight"),
            ]
            if m.qkv_bias:
                rules.append(_grouped_qkv(c + "attention.wqkv.bias", s + "attention.wqkv.bias", m))
            continue
        rules += [
            _same(c + "attention_norm.weight", s + "input_layernorm.weight"),
            _same(c + "attention.wo.weight", s + "self_attn.o_proj.weight"),
            _same(c + "ffn_norm.weight", s + "post_attention_layernorm.weight"),
            _same(c + "feed_forward.w2.weight", s + "mlp.down_proj.weight"),
        ]
        leaves = ("weight", "bias") if m.qkv_bias else ("weight",)
        if naming == "phi3":
            rules += [_same(c + f"attention.wqkv.{leaf}", s + f"self_attn.qkv_proj.{leaf}") for leaf in leaves]
            rules.append(_same(c + "feed_forward.w13.weight", s + "mlp.gate_up_proj.weight"))
        else:
            rules += [
                _rows(c + f"attention.wqkv.{leaf}", tuple(s + f"self_attn.{p}_proj.{leaf}" for p in "qkv"), sizes_qkv)
                for leaf in leaves
            ]
            rules.append(
                _rows(c + "feed_forward.w13.weight", (s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"),
                      [m.intermediate_size] * 2)
            )
    rules.append(_same("language_model.norm.weight", body + "norm.weight"))
    if not m.tie_word_embeddings:
        rules.append(_same("language_model.output.weight", head))
    return rules


def conversion_rules(cfg: ModelConfig, layout: Layout) -> list[Rule]:
    """One rule per canonical tensor (the LM head only when untied), for ``cfg`` stored in ``layout``."""
    return _vision_rules(cfg, layout) + _llm_rules(cfg, layout)


# Older -hf files (transformers < 4.52 style) name the parts without the "model." level.
_HF_ALIASES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _hf_name(key: str) -> str:
    for old, new in _HF_ALIASES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# ---------------------------------------------------------------------------------------------------------
# Reading weights


def load_state_dict(
    model_dir: Path,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The canonical state dict of a checkpoint, one tensor at a time (peak memory: the result + one tensor).

    ``dtype``: cast every tensor to it (None keeps the stored dtype); ``device``: where the result lives.
    """
    model_dir = Path(model_dir)
    layout = detect_layout(read_json(model_dir / "config.json"), model_dir)
    where: dict[str, tuple[Any, str]] = {}  # rule source name -> (file handle, stored name)
    for handle in open_weights(model_dir):
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            where[_hf_name(key) if layout == "hf" else key] = (handle, key)
    rules = conversion_rules(cfg, layout)
    needed = {s for r in rules for s in r.sources}
    if missing := needed - where.keys():
        raise ModelLoadError(
            f"checkpoint {model_dir} does not match its config.json: {len(missing)} tensors missing ({few(missing)})"
        )
    ignorable = {k for k in where if k.endswith(_IGNORED_SUFFIXES)}
    if cfg.llm.tie_word_embeddings:
        ignorable |= set(HEAD_KEYS) & where.keys()
    if unexpected := where.keys() - needed - ignorable:
        raise ModelLoadError(
            f"checkpoint {model_dir} does not match its config.json: {len(unexpected)} unexpected tensors "
            f"({few(unexpected)})"
        )
    shapes = canonical_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        try:
            parts = [handle.get_tensor(key) for handle, key in map(where.__getitem__, rule.sources)]
        except (OSError, SafetensorError) as exc:  # a file truncated or changed since its header was read
            raise ModelLoadError(f"cannot read {rule.canonical} from {model_dir}: {exc}") from exc
        tensor = rule.merge(parts)
        if tuple(tensor.shape) != shapes[rule.canonical]:
            raise ModelLoadError(
                f"checkpoint {model_dir}: {rule.canonical} has shape {tuple(tensor.shape)}, the config implies "
                f"{shapes[rule.canonical]}"
            )
        state[rule.canonical] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return state

