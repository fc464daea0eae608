"""Writing checkpoints in both layouts ptp reads (for the tiny model, random-weight benchmarks and tests).

The inverse of ``ptp_cli.loading``: a canonical state dict is split by the same ``conversion_rules`` the
loader merges with, and the config files are written the way the published checkpoints write them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.loading.configs import ORIGINAL_BACKBONES
from ptp_cli.loading.files import Layout, few
from ptp_cli.loading.weights import canonical_shapes, conversion_rules
from ptp_cli.text.tokenization import IMG_CONTEXT_TOKEN, load_tokenizer

# Files copied along with the weights when a checkpoint is written.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
)


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
        raise ValueError(f"canonical state dict lacks {few(missing)}")
    out: dict[str, torch.Tensor] = {}
    for rule in conversion_rules(cfg, layout):
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
    arch_class = {v: k for k, v in ORIGINAL_BACKBONES.items()}[arch]
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


# The transformers causal-LM class vLLM loads natively for each text architecture of the -hf layout.
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}
_HF_LLM_PREFIX = "model.language_model."


def save_llm_view(canonical: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: Path) -> Path:
    """Write the LLM part of an InternVL checkpoint as a plain transformers causal LM (Llama for InternLM2,
    Qwen2, Phi-3), which engines such as vLLM load without remote code. The visual side is left out: the caller
    feeds input embeddings. Tensors are split as the -hf layout splits them (InternLM2's grouped wqkv into
    q/k/v), then renamed from the -hf wrapper's ``model.language_model.*`` to ``model.*``."""
    text_arch = "llama" if cfg.llm.arch == "internlm2" else cfg.llm.arch
    text_cfg = replace(cfg, llm=replace(cfg.llm, arch=text_arch))
    hf = _to_layout(canonical, text_cfg, "hf")
    tensors = {"model." + k.removeprefix(_HF_LLM_PREFIX): t for k, t in hf.items() if k.startswith(_HF_LLM_PREFIX)}
    if not cfg.llm.tie_word_embeddings:
        tensors["lm_head.weight"] = hf["lm_head.weight"]
    config = _llm_json(cfg.llm, text_arch) | {"architectures": [_CAUSAL_LM[text_arch]], "torch_dtype": _dtype_name(tensors)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tensors(tensors, out_dir, max_shard_bytes=None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
