"""Reading a checkpoint's config.json (either layout) into a ``ModelConfig``.

- ``original``: OpenGVLab's ``InternVLChatModel`` (``vision_config`` + ``llm_config`` of an InternLM2, Qwen2,
  Llama or Phi-3 backbone, tiling limits in config.json);
- ``hf``: transformers' ``InternVLForConditionalGeneration`` (``vision_config`` + ``text_config``; the tiling
  limits live in preprocessor_config.json, as ``min_patches``/``max_patches``/``crop_to_patches``).

Anything ptp's model code cannot run exactly is refused here with a ``ModelLoadError`` naming the field.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.errors import ModelLoadError
from ptp_cli.loading.files import HEAD_KEYS, detect_layout, read_json, stored_keys

# Backbone class in an original config's llm_config.architectures -> LLMConfig.arch.
ORIGINAL_BACKBONES = {
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
# The tiling settings of a -hf checkpoint's preprocessor_config.json, with transformers' defaults.
_HF_TILING = {"min_patches": 1, "max_patches": 12, "crop_to_patches": True}


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
    if not archs or archs[0] not in ORIGINAL_BACKBONES:
        got = archs[0] if archs else "none"
        raise ModelLoadError(
            f"unsupported checkpoint: LLM backbone {got!r} (supported: {', '.join(ORIGINAL_BACKBONES)})"
        )
    arch = ORIGINAL_BACKBONES[archs[0]]
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


def _hf_tiling(model_dir: Path) -> tuple[int, int, bool]:
    """(min tiles, max tiles, thumbnail) from preprocessor_config.json, as transformers' InternVLProcessor
    tiles: ``crop_to_patches`` false means one whole-image tile and no thumbnail."""
    tiles = dict(_HF_TILING)
    pre = model_dir / "preprocessor_config.json"
    if pre.is_file() and isinstance(p := read_json(pre), dict):
        tiles.update({k: p[k] for k in tiles if k in p})
    if not bool(tiles["crop_to_patches"]):
        return 1, 1, False
    return int(tiles["min_patches"]), int(tiles["max_patches"]), True


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
    min_tiles, max_tiles, thumbnail = _hf_tiling(model_dir)
    return ModelConfig(
        vision=_vision_hf(raw.get("vision_config") or {}),
        llm=_llm_config(text, arch),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        ps_version="v2",
        select_layer=layer,
        template=_HF_TEMPLATES[arch],
        min_dynamic_patch=min_tiles,
        max_dynamic_patch=max_tiles,
        use_thumbnail=thumbnail,
    )


def load_config(model_dir: Path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint directory (original InternVL2 or transformers -hf layout)."""
    model_dir = Path(model_dir)
    raw = read_json(model_dir / "config.json")
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{model_dir / 'config.json'} is not a JSON object")
    try:
        cfg = _parse_original(raw) if detect_layout(raw, model_dir) == "original" else _parse_hf(raw, model_dir)
    except KeyError as exc:
        raise ModelLoadError(f"bad config in {model_dir}: missing {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"bad config in {model_dir}: {exc}") from exc
    if cfg.ps_version not in ("v1", "v2"):
        raise ModelLoadError(f"unsupported checkpoint: ps_version {cfg.ps_version!r}")
    if cfg.downsample_ratio != 0.5:
        raise ModelLoadError(f"unsupported checkpoint: downsample_ratio {cfg.downsample_ratio} (only 0.5)")
    if cfg.llm.tie_word_embeddings and (keys := stored_keys(model_dir)) and keys & set(HEAD_KEYS):
        # A stored head wins over the flag, as in transformers v5 (which unties when both are stored).
        cfg = replace(cfg, llm=replace(cfg.llm, tie_word_embeddings=False))
    return cfg.with_name(str(model_dir))

