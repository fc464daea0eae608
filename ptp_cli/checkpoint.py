"""Checkpoints: find them, parse their config, convert their weights to the model's canonical names.

Two on-disk layouts are read (and written, for tests and random-weight benchmarks):

- ``original``: OpenGVLab's ``InternVLChatModel`` (``vision_model.*``, ``mlp1.*``, ``language_model.*`` in the
  backbone's own naming: InternLM2, Qwen2, Llama or Phi-3);
- ``hf``: transformers' ``InternVLForConditionalGeneration`` (the "-hf" repositories).

Every format quirk (InternLM2's grouped wqkv, split or fused q/k/v and gate/up, renamed ViT keys) is handled
here, once, by a table of ``_Rule``s: each canonical tensor is made from one or more stored tensors (``merge``)
and back (``split``). The canonical names are those of ``InternVLModel.state_dict()``:

    language_model.layers.{i}.attention.wqkv   rows: all q heads | all k heads | all v heads
    language_model.layers.{i}.feed_forward.w13 rows: gate | up
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.errors import ModelLoadError
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.tokenization import IMG_CONTEXT_TOKEN, Tokenizer, load_tokenizer

Layout = Literal["original", "hf"]

# Backbone class in an original config's llm_config.architectures -> LLMConfig.arch.
_ORIGINAL_BACKBONES = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}
# text_config.model_type of a -hf checkpoint -> LLMConfig.arch (InternLM2 is published as Llama there).
_HF_TEXT_TYPES = {"qwen2": "qwen2", "llama": "llama", "phi3": "phi3"}
# Prompt template when the checkpoint does not name one.
_DEFAULT_TEMPLATES = {"internlm2": "internlm2-chat", "qwen2": "Hermes-2", "llama": "internvl2_5", "phi3": "phi3-chat"}
_HF_TEMPLATES = {"qwen2": "internvl2_5", "llama": "internvl2_5", "phi3": "phi3-chat"}
_ROPE_TYPES = ("default", "linear", "dynamic", "longrope", "llama3")

# Files copied along with the weights when a checkpoint is written.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # stale buffers some older files carry
_HEAD_KEYS = ("language_model.output.weight", "language_model.lm_head.weight", "lm_head.weight")


# ---------------------------------------------------------------------------------------------------------
# Finding a checkpoint


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (huggingface_hub reads it once, at import)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str, *, offline: bool | None = None) -> Path:
    """A checkpoint directory for ``name_or_path``: a local directory, ``"tiny"`` (the built-in test model),
    ``"mini"`` (the trained miniature InternVL2 shipped in the package), or a hub id (``OpenGVLab/InternVL2-2B``) taken from the local Hugging Face cache, else downloaded.

    ``offline``: never touch the network (default: the HF_HUB_OFFLINE environment variable).
    """
    if name_or_path == "tiny":
        from ptp_cli.tiny import ensure_tiny  # tiny.py writes checkpoints with this module

        return ensure_tiny()
    if name_or_path == "mini":
        from ptp_cli.mini.shipped import shipped_checkpoint

        return shipped_checkpoint()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"--model {name_or_path} is a file; pass the checkpoint's directory")
    if not _HUB_ID.match(name_or_path):
        raise ModelLoadError(
            f"model {name_or_path!r} is neither an existing directory nor a Hugging Face hub id (owner/name)"
        )
    if offline is None:
        offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    cache = _hf_cache_dir()
    try:
        local = Path(snapshot_download(name_or_path, cache_dir=cache, local_files_only=True))
        if offline or _has_weights(local):  # a partial snapshot (no weights) is completed online
            return local
    except LocalEntryNotFoundError:
        pass
    advice = f"download it on a machine with internet (hf download {name_or_path}) or pass --model /path/to/checkpoint"
    if offline:
        raise ModelLoadError(
            f"model {name_or_path!r} is not in the local Hugging Face cache ({cache}) and the hub cannot be "
            f"reached (offline mode); {advice}"
        )
    try:
        return Path(snapshot_download(name_or_path, cache_dir=cache, allow_patterns=_HUB_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"model {name_or_path!r} was not found on the Hugging Face hub (a private or gated repository needs "
            "`hf auth login`)"
        ) from exc
    except Exception as exc:  # network failures surface as many types (httpx, OSError, hub errors)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot download model {name_or_path!r} from the Hugging Face hub ({reason}); {advice}") from exc


# ---------------------------------------------------------------------------------------------------------
# Config parsing


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path.parent} is not a model checkpoint: no {path.name}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _layout(raw: dict[str, Any], where: Path) -> Layout:
    archs = raw.get("architectures") or []
    if raw.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in archs:
        return "hf"
    if raw.get("model_type") == "internvl_chat" or "InternVLChatModel" in archs or "llm_config" in raw:
        return "original"
    what = raw.get("model_type") or (archs[0] if archs else "unknown")
    raise ModelLoadError(
        f"unsupported checkpoint in {where}: model type {what!r} (ptp reads InternVLChatModel and "
        "InternVLForConditionalGeneration checkpoints)"
    )


def _side(size: Any) -> int:
    """image_size / patch_size written as an int or [h, w]; only squares are supported."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ModelLoadError(f"unsupported checkpoint: non-square size {list(size)}")
        return int(size[0])
    return int(size)


def _rope(llm: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised rope_scaling) from a backbone config, transformers v4 or v5 style.

    The scaling dict is {"rope_type": ..., params...}; longrope also carries original_max_position_embeddings.
    """
    merged = {**(llm.get("rope_scaling") or {}), **(llm.get("rope_parameters") or {})}
    theta = float(merged.pop("rope_theta", llm.get("rope_theta", 10000.0)))
    if float(merged.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("unsupported checkpoint: partial rotary embeddings")
    legacy = merged.pop("type", None)
    kind = merged.pop("rope_type", None) or legacy or "default"
    if kind == "su":  # Phi-3's original name for longrope
        kind = "longrope"
    if kind not in _ROPE_TYPES:
        raise ModelLoadError(f"unsupported checkpoint: rope scaling {kind!r} (supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    if kind == "longrope":
        merged.setdefault(
            "original_max_position_embeddings",
            llm.get("original_max_position_embeddings") or llm.get("max_position_embeddings"),
        )
        for key in ("short_factor", "long_factor"):
            if key not in merged:
                raise ModelLoadError(f"unsupported checkpoint: longrope scaling without {key}")
    return theta, {"rope_type": kind, **merged}


def _llm_config(llm: dict[str, Any], arch: str) -> LLMConfig:
    name = {"internlm2": "InternLM2", "qwen2": "Qwen2", "llama": "Llama", "phi3": "Phi-3"}[arch]
    if llm.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported checkpoint: {name} activation {llm['hidden_act']!r} (only silu)")
    if arch == "internlm2" and llm.get("bias", True):
        raise ModelLoadError("unsupported checkpoint: InternLM2 with bias=true (biased wqkv and wo)")
    if arch == "llama" and (llm.get("attention_bias") or llm.get("mlp_bias")):
        raise ModelLoadError("unsupported checkpoint: Llama with attention_bias or mlp_bias")
    if arch == "qwen2" and llm.get("use_sliding_window"):
        raise ModelLoadError("unsupported checkpoint: Qwen2 with use_sliding_window=true")
    max_pos = int(llm.get("max_position_embeddings", 2048))
    if arch == "phi3" and (llm.get("sliding_window") or max_pos) < max_pos:
        raise ModelLoadError(f"unsupported checkpoint: Phi-3 sliding window {llm['sliding_window']} < context {max_pos}")
    theta, scaling = _rope(llm)
    heads = int(llm["num_attention_heads"])
    hidden = int(llm["hidden_size"])
    head_dim = llm.get("head_dim")
    return LLMConfig(
        arch=arch,
        vocab_size=int(llm["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(llm["intermediate_size"]),
        num_layers=int(llm["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(llm.get("num_key_value_heads") or heads),
        head_dim_override=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        qkv_bias=arch == "qwen2",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )


def _vision_original(v: dict[str, Any]) -> VisionConfig:
    if v.get("hidden_act", "gelu") != "gelu":
        raise ModelLoadError(f"unsupported checkpoint: ViT activation {v['hidden_act']!r} (only gelu)")
    if v.get("num_channels", 3) != 3:
        raise ModelLoadError("unsupported checkpoint: ViT input with other than 3 channels")
    return VisionConfig(
        hidden_size=int(v["hidden_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        image_size=_side(v.get("image_size", 448)),
        patch_size=_side(v.get("patch_size", 14)),
        qkv_bias=bool(v.get("qkv_bias", False)),
        qk_norm=bool(v.get("qk_normalization", True)),  # InternVisionConfig's defaults, here and below
        norm_type=str(v.get("norm_type", "rms_norm")),
        norm_eps=float(v.get("layer_norm_eps", 1e-6)),
    )


def _vision_hf(v: dict[str, Any]) -> VisionConfig:
    if not v.get("use_mean_pooling", True):
        raise ModelLoadError("unsupported checkpoint: ViT with use_mean_pooling=false (a final LayerNorm)")
    if not v.get("use_absolute_position_embeddings", True):
        raise ModelLoadError("unsupported checkpoint: ViT without absolute position embeddings")
    return _vision_original(
        {
            **v,
            "qkv_bias": v.get("attention_bias", False),
            "qk_normalization": v.get("use_qk_norm", False),
            "norm_type": v.get("norm_type", "layer_norm"),
        }
    )


def _parse_original(raw: dict[str, Any]) -> ModelConfig:
    llm = raw.get("llm_config") or {}
    archs = llm.get("architectures") or []
    if not archs or archs[0] not in _ORIGINAL_BACKBONES:
        got = archs[0] if archs else "none"
        raise ModelLoadError(
            f"unsupported checkpoint: LLM backbone {got!r} (supported: {', '.join(_ORIGINAL_BACKBONES)})"
        )
    arch = _ORIGINAL_BACKBONES[archs[0]]
    vision = _vision_original(raw.get("vision_config") or {})
    forced = raw.get("force_image_size")
    if forced and int(forced) != vision.image_size:
        raise ModelLoadError(
            f"unsupported checkpoint: force_image_size {forced} differs from the ViT's image_size {vision.image_size}"
        )
    dynamic = bool(raw.get("dynamic_image_size", True))
    return ModelConfig(
        vision=vision,
        llm=_llm_config(llm, arch),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        ps_version=str(raw.get("ps_version", "v1")),
        select_layer=int(raw.get("select_layer", -1)),
        template=str(raw.get("template") or _DEFAULT_TEMPLATES[arch]),
        system_message=raw.get("system_message"),
        min_dynamic_patch=int(raw.get("min_dynamic_patch", 1)) if dynamic else 1,
        max_dynamic_patch=int(raw.get("max_dynamic_patch", 6)) if dynamic else 1,
        use_thumbnail=bool(raw.get("use_thumbnail", False)) and dynamic,
    )


def _parse_hf(raw: dict[str, Any], model_dir: Path) -> ModelConfig:
    text = dict(raw.get("text_config") or {})
    kind = text.get("model_type", "qwen2")
    if kind not in _HF_TEXT_TYPES:
        raise ModelLoadError(
            f"unsupported checkpoint: text model {kind!r} (supported: {', '.join(_HF_TEXT_TYPES)})"
        )
    arch = _HF_TEXT_TYPES[kind]
    # transformers v5 ties on the top-level flag (default true), v4 on text_config's; a stored head unties (below).
    text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", True) or text.get("tie_word_embeddings"))
    text.setdefault("hidden_act", "silu")
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise ModelLoadError("unsupported checkpoint: vision_feature_select_strategy other than 'default'")
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise ModelLoadError(f"unsupported checkpoint: projector activation {raw['projector_hidden_act']!r}")
    layer = raw.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ModelLoadError("unsupported checkpoint: several vision_feature_layer values")
    tiles = {"min_patches": 1, "max_patches": 12, "crop_to_patches": True}
    pre = model_dir / "preprocessor_config.json"
    if pre.is_file() and isinstance(p := _read_json(pre), dict):
        tiles.update({k: p[k] for k in tiles if k in p})
    crop = bool(tiles["crop_to_patches"])
    return ModelConfig(
        vision=_vision_hf(raw.get("vision_config") or {}),
        llm=_llm_config(text, arch),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        ps_version="v2",
        select_layer=layer,
        template=_HF_TEMPLATES[arch],
        min_dynamic_patch=int(tiles["min_patches"]) if crop else 1,
        max_dynamic_patch=int(tiles["max_patches"]) if crop else 1,
        use_thumbnail=crop,
    )


def load_config(model_dir: Path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint directory (original InternVL2 or transformers -hf layout)."""
    model_dir = Path(model_dir)
    raw = _read_json(model_dir / "config.json")
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{model_dir / 'config.json'} is not a JSON object")
    try:
        cfg = _parse_original(raw) if _layout(raw, model_dir) == "original" else _parse_hf(raw, model_dir)
    except KeyError as exc:
        raise ModelLoadError(f"bad config in {model_dir}: missing {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"bad config in {model_dir}: {exc}") from exc
    if cfg.ps_version not in ("v1", "v2"):
        raise ModelLoadError(f"unsupported checkpoint: ps_version {cfg.ps_version!r}")
    if cfg.downsample_ratio != 0.5:
        raise ModelLoadError(f"unsupported checkpoint: downsample_ratio {cfg.downsample_ratio} (only 0.5)")
    if cfg.llm.tie_word_embeddings and (keys := _stored_keys(model_dir)) and keys & set(_HEAD_KEYS):
        # A stored head wins over the flag, as in transformers v5 (which unties when both are stored).
        cfg = replace(cfg, llm=replace(cfg.llm, tie_word_embeddings=False))
    return cfg.with_name(str(model_dir))


# ---------------------------------------------------------------------------------------------------------
# Canonical names and shapes


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``InternVLModel(cfg).state_dict()`` (LM head omitted when tied), in a fixed order."""
    v, m = cfg.vision, cfg.llm
    c, d = v.hidden_size, m.hidden_size
    merged = c * cfg.shuffle_factor**2
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, v.patch_size, v.patch_size),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, v.num_patches + 1, c),
    }
    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        shapes[p + "norm1.weight"] = (c,)
        if v.norm_type == "layer_norm":
            shapes[p + "norm1.bias"] = (c,)
        shapes[p + "attn.qkv.weight"] = (3 * c, c)
        if v.qkv_bias:
            shapes[p + "attn.qkv.bias"] = (3 * c,)
        if v.qk_norm:
            shapes[p + "attn.q_norm.weight"] = (c,)
            shapes[p + "attn.k_norm.weight"] = (c,)
        shapes[p + "attn.proj.weight"] = (c, c)
        shapes[p + "attn.proj.bias"] = (c,)
        shapes[p + "ls1"] = (c,)
        shapes[p + "norm2.weight"] = (c,)
        if v.norm_type == "layer_norm":
            shapes[p + "norm2.bias"] = (c,)
        shapes[p + "mlp.fc1.weight"] = (v.intermediate_size, c)
        shapes[p + "mlp.fc1.bias"] = (v.intermediate_size,)
        shapes[p + "mlp.fc2.weight"] = (c, v.intermediate_size)
        shapes[p + "mlp.fc2.bias"] = (c,)
        shapes[p + "ls2"] = (c,)
    shapes |= {
        "mlp1.0.weight": (merged,), "mlp1.0.bias": (merged,),
        "mlp1.1.weight": (d, merged), "mlp1.1.bias": (d,),
        "mlp1.3.weight": (d, d), "mlp1.3.bias": (d,),
        "language_model.tok_embeddings.weight": (m.vocab_size, d),
    }
    qkv = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
    for i in range(m.num_layers):
        p = f"language_model.layers.{i}."
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "attention.wqkv.weight"] = (qkv, d)
        if m.qkv_bias:
            shapes[p + "attention.wqkv.bias"] = (qkv,)
        shapes[p + "attention.wo.weight"] = (d, m.num_heads * m.head_dim)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "feed_forward.w13.weight"] = (2 * m.intermediate_size, d)
        shapes[p + "feed_forward.w2.weight"] = (d, m.intermediate_size)
    shapes["language_model.norm.weight"] = (d,)
    if not m.tie_word_embeddings:
        shapes["language_model.output.weight"] = (m.vocab_size, d)
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
class _Rule:
    """One canonical tensor = merge(stored tensors); stored tensors = split(canonical tensor)."""

    canonical: str
    sources: tuple[str, ...]
    merge: Callable[[list[torch.Tensor]], torch.Tensor] = _first
    split: Callable[[torch.Tensor], list[torch.Tensor]] = _single


def _same(canonical: str, source: str) -> _Rule:
    return _Rule(canonical, (source,))


def _rows(canonical: str, sources: tuple[str, ...], sizes: list[int]) -> _Rule:
    """Canonical rows = the sources' rows stacked in order (fused q|k|v, gate|up)."""
    return _Rule(canonical, sources, _cat, lambda t: list(t.split(sizes, dim=0)))


def _grouped_qkv(canonical: str, source: str, m: LLMConfig) -> _Rule:
    """InternLM2's wqkv: rows [Hkv, g + 2, hd] (g q heads, then k, then v, per kv head) <-> q | k | v."""
    g, hkv, hd = m.num_heads // m.num_kv_heads, m.num_kv_heads, m.head_dim

    def merge(ts: list[torch.Tensor]) -> torch.Tensor:
        w = ts[0].unflatten(0, (hkv, g + 2, hd))  # [Hkv, g+2, hd, (D)]
        return torch.cat([w[:, :g].flatten(0, 2), w[:, g].flatten(0, 1), w[:, g + 1].flatten(0, 1)])

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = t.split([m.num_heads * hd, hkv * hd, hkv * hd])
        parts = [q.unflatten(0, (hkv, g, hd)), k.unflatten(0, (hkv, 1, hd)), v.unflatten(0, (hkv, 1, hd))]
        return [torch.cat(parts, dim=1).flatten(0, 2)]

    return _Rule(canonical, (source,), merge, split)


# A ViT block's parameters (after "layers.{i}.") -> their -hf names (after "layer.{i}."); qkv is split apart.
_HF_VIT_RENAMES = (
    ("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."), ("attn.k_norm.", "attention.k_norm."), ("ls1", "lambda_1"),
    ("ls2", "lambda_2"), ("mlp.", "mlp."),
)


def _vision_rules(cfg: ModelConfig, layout: Layout) -> list[_Rule]:
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


def _llm_rules(cfg: ModelConfig, layout: Layout) -> list[_Rule]:
    m = cfg.llm
    hd = m.head_dim
    sizes_qkv = [m.num_heads * hd, m.num_kv_heads * hd, m.num_kv_heads * hd]
    naming = m.arch if layout == "original" else ("llama" if m.arch == "internlm2" else m.arch)
    body, head = ("language_model.model.", "language_model.lm_head.weight")
    if layout == "hf":
        body, head = "model.language_model.", "lm_head.weight"
    rules: list[_Rule] = []
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


def _rules(cfg: ModelConfig, layout: Layout) -> list[_Rule]:
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


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        files = sorted({model_dir / name for name in weight_map.values()})
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelLoadError(f"{model_dir} is missing weight shards: {', '.join(missing[:5])}")
        return files
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    legacy = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if legacy:
        raise ModelLoadError(
            f"{model_dir} has only PyTorch pickle weights ({', '.join(legacy[:3])}); ptp reads safetensors only, "
            "so convert them to safetensors first (e.g. load with transformers and save_pretrained)"
        )
    raise ModelLoadError(f"no weights in {model_dir}: expected model.safetensors or model.safetensors.index.json")


def _has_weights(model_dir: Path) -> bool:
    try:
        _weight_files(model_dir)
    except ModelLoadError:
        return False
    return True


def _stored_keys(model_dir: Path) -> set[str] | None:
    """Names of the stored tensors (headers only), or None when there are no weight files yet."""
    if not _has_weights(model_dir):
        return None
    keys: set[str] = set()
    for handle in _open_all(_weight_files(model_dir)):
        keys.update(handle.keys())
    return keys


def _few(names: set[str] | list[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _open_all(files: list[Path]) -> Iterator[Any]:
    for f in files:
        try:
            yield safe_open(f, framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"cannot read {f}: {exc}") from exc


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
    layout = _layout(_read_json(model_dir / "config.json"), model_dir)
    where: dict[str, tuple[Any, str]] = {}  # rule source name -> (file handle, stored name)
    for handle in _open_all(_weight_files(model_dir)):
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            where[_hf_name(key) if layout == "hf" else key] = (handle, key)
    rules = _rules(cfg, layout)
    needed = {s for r in rules for s in r.sources}
    if missing := needed - where.keys():
        raise ModelLoadError(
            f"checkpoint {model_dir} does not match its config.json: {len(missing)} tensors missing ({_few(missing)})"
        )
    ignorable = {k for k in where if k.endswith(_IGNORED_SUFFIXES)}
    if cfg.llm.tie_word_embeddings:
        ignorable |= set(_HEAD_KEYS) & where.keys()
    if unexpected := where.keys() - needed - ignorable:
        raise ModelLoadError(
            f"checkpoint {model_dir} does not match its config.json: {len(unexpected)} unexpected tensors "
            f"({_few(unexpected)})"
        )
    shapes = canonical_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = []
        for src in rule.sources:
            handle, key = where[src]
            parts.append(handle.get_tensor(key))
        tensor = rule.merge(parts)
        if tuple(tensor.shape) != shapes[rule.canonical]:
            raise ModelLoadError(
                f"checkpoint {model_dir}: {rule.canonical} has shape {tuple(tensor.shape)}, the config implies "
                f"{shapes[rule.canonical]}"
            )
        state[rule.canonical] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return state


# ---------------------------------------------------------------------------------------------------------
# Loading a model


@dataclass(frozen=True)
class LoadedModel:
    path: Path  # the checkpoint directory
    cfg: ModelConfig  # its parsed config (name: what the user asked for)
    model: InternVLModel  # in eval mode, on the requested device and dtype, no gradients
    tokenizer: Tokenizer
    image_token_id: int  # id of <IMG_CONTEXT>, the placeholder the visual tokens replace


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> InternVLModel:
    """An eval-mode, gradient-free ``InternVLModel`` holding ``state``'s tensors (no copy, no random init).

    Dtype and device are those of ``state`` (e.g. ``tiny.random_state_dict`` drawn directly on a GPU).
    """
    with torch.device("meta"):  # no allocation: the tensors are assigned below
        model = InternVLModel(cfg)
    model.load_weights(state)
    if leftover := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"tensors left on the meta device after loading: {_few(leftover)}")
    return model.eval().requires_grad_(False)


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offline: bool | None = None,
) -> LoadedModel:
    """Resolve, parse and load a checkpoint (see ``resolve_model`` for what ``name_or_path`` may be)."""
    path = resolve_model(str(name_or_path), offline=offline)
    cfg = load_config(path).with_name(str(name_or_path))
    tokenizer = load_tokenizer(path)
    image_token_id = tokenizer.token_to_id(IMG_CONTEXT_TOKEN)
    if image_token_id is None:
        raise ModelLoadError(f"the tokenizer in {path} has no {IMG_CONTEXT_TOKEN} token")
    if image_token_id >= cfg.llm.vocab_size:
        raise ModelLoadError(
            f"{IMG_CONTEXT_TOKEN} has id {image_token_id}, beyond the model's vocabulary ({cfg.llm.vocab_size})"
        )
    model = build_model(cfg, load_state_dict(path, cfg, dtype=dtype, device=device))
    return LoadedModel(path=path, cfg=cfg, model=model, tokenizer=tokenizer, image_token_id=image_token_id)


# ---------------------------------------------------------------------------------------------------------
# Writing checkpoints (the tiny model, random-weight benchmarks, tests)


def _write_tensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, *, max_shard_bytes: int | None
) -> None:
    """model.safetensors, or shards plus model.safetensors.index.json when ``max_shard_bytes`` is exceeded."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _to_layout(canonical: dict[str, torch.Tensor], cfg: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    shapes = canonical_shapes(cfg)
    if missing := shapes.keys() - canonical.keys():
        raise ValueError(f"canonical state dict lacks {_few(missing)}")
    out: dict[str, torch.Tensor] = {}
    for rule in _rules(cfg, layout):
        parts = rule.split(canonical[rule.canonical])
        fresh = len(rule.sources) > 1 or parts[0] is not canonical[rule.canonical]
        for src, t in zip(rule.sources, parts, strict=True):
            out[src] = t.clone(memory_format=torch.contiguous_format) if fresh else t.contiguous()
    return out


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    return str(next(iter(state.values())).dtype).removeprefix("torch.")


def _rope_legacy(m: LLMConfig) -> dict[str, Any] | None:
    """rope_scaling as backbone configs have long written it ("type" key; Phi-3 keeps exactly three keys)."""
    if not m.rope_scaling:
        return None
    scaling = dict(m.rope_scaling)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return None
    if kind == "longrope":
        return {"type": "longrope", "short_factor": scaling["short_factor"], "long_factor": scaling["long_factor"]}
    return {"type": kind, **scaling}


def _llm_json(m: LLMConfig, arch: str) -> dict[str, Any]:
    """A backbone config (llm_config / text_config) for ``arch``; ValueError when the weights cannot be expressed."""
    if m.qkv_bias != (arch == "qwen2"):
        raise ValueError(f"a {arch} checkpoint cannot express qkv_bias={m.qkv_bias}")
    if arch in ("internlm2", "phi3") and m.head_dim_override:
        raise ValueError(f"a {arch} checkpoint cannot express head_dim={m.head_dim}")
    arch_class = {v: k for k, v in _ORIGINAL_BACKBONES.items()}[arch]
    out: dict[str, Any] = {
        "architectures": [arch_class],
        "model_type": arch,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "hidden_act": m.hidden_act,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": _rope_legacy(m),
        "tie_word_embeddings": m.tie_word_embeddings,
    }
    if arch == "internlm2":
        out["bias"] = False
    if arch == "llama":
        out |= {"attention_bias": False, "mlp_bias": False, "head_dim": m.head_dim}
    if arch == "qwen2":
        out |= {"use_sliding_window": False, "sliding_window": None, "head_dim": m.head_dim}
    if arch == "phi3":
        original = (m.rope_scaling or {}).get("original_max_position_embeddings", m.max_position_embeddings)
        out |= {"original_max_position_embeddings": original, "sliding_window": None}
    return out


def _vision_json(v: VisionConfig) -> dict[str, Any]:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": 3,
        "qkv_bias": v.qkv_bias,
        "qk_normalization": v.qk_norm,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps,
        "hidden_act": v.hidden_act,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
    }


def _copy_tokenizer(tokenizer_dir: Path | None, out_dir: Path) -> None:
    if tokenizer_dir is None or Path(tokenizer_dir).resolve() == out_dir.resolve():
        return
    for name in _TOKENIZER_FILES:
        if (src := Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(src, out_dir / name)


def save_original_layout(
    canonical: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    *,
    llm_arch: str,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json and safetensors in OpenGVLab's InternVLChatModel layout, with ``llm_arch`` weights."""
    cfg = replace(cfg, llm=replace(cfg.llm, arch=llm_arch))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": cfg.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": cfg.vision.image_size,
        "min_dynamic_patch": cfg.min_dynamic_patch,
        "max_dynamic_patch": cfg.max_dynamic_patch,
        "use_thumbnail": cfg.use_thumbnail,
        "ps_version": cfg.ps_version,
        "select_layer": cfg.select_layer,
        "template": cfg.template,
        "torch_dtype": _dtype_name(canonical),
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "vision_config": _vision_json(cfg.vision),
        "llm_config": _llm_json(cfg.llm, llm_arch),
    }
    if cfg.system_message is not None:
        config["system_message"] = cfg.system_message
    stored = _to_layout(canonical, cfg, "original")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tensors(stored, out_dir, max_shard_bytes=max_shard_bytes)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def save_hf_layout(
    canonical: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a transformers ``InternVLForConditionalGeneration`` checkpoint (InternLM2 weights become Llama)."""
    if cfg.ps_version != "v2":
        raise ValueError("the -hf layout only has pixel-shuffle v2")
    text_arch = "llama" if cfg.llm.arch == "internlm2" else cfg.llm.arch
    cfg = replace(cfg, llm=replace(cfg.llm, arch=text_arch))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    v = cfg.vision
    text = _llm_json(cfg.llm, text_arch)
    text.pop("architectures")
    config: dict[str, Any] = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": cfg.downsample_ratio,
        "image_seq_length": cfg.tokens_per_tile,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
        "torch_dtype": _dtype_name(canonical),
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "hidden_act": v.hidden_act,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": 3,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_norm,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps,
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
        },
        "text_config": text,
    }
    if tokenizer_dir is not None:
        image_id = load_tokenizer(Path(tokenizer_dir)).token_to_id(IMG_CONTEXT_TOKEN)
        if image_id is not None:
            config["image_token_id"] = image_id
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "crop_to_patches": cfg.max_dynamic_patch > 1,
        "min_patches": cfg.min_dynamic_patch,
        "max_patches": cfg.max_dynamic_patch,
        "size": {"height": v.image_size, "width": v.image_size},
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }
    stored = _to_layout(canonical, cfg, "hf")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    _write_tensors(stored, out_dir, max_shard_bytes=max_shard_bytes)
    _copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir
