"""Checkpoint finding, config parsing (both layouts), weight conversion round trips, and loading errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ptp_cli.builders.tiny import random_state_dict
from ptp_cli.builders.writers import save_hf_layout, save_original_layout
from ptp_cli.config import SHAPES, LLMConfig, ModelConfig, VisionConfig
from ptp_cli.errors import ModelLoadError
from ptp_cli.loading import canonical_shapes, load_config, load_state_dict, resolve_model
from ptp_cli.preprocess.image import TilingOptions

# ---------------------------------------------------------------------------------------------------------
# Config files modelled on the published checkpoints (abridged: fields ptp does not read are mostly left out)

VIT_300M = {
    "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "attention_dropout": 0.0,
    "drop_path_rate": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1024, "image_size": 448,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-06,
    "norm_type": "layer_norm", "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24,
    "patch_size": 14, "qk_normalization": False, "qkv_bias": True, "use_flash_attn": True,
}
TOP = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
    "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
    "ps_version": "v2", "select_layer": -1, "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
    "torch_dtype": "bfloat16",
}
INTERNVL2_2B = {
    **TOP, "template": "internlm2-chat", "vision_config": VIT_300M,
    "llm_config": {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "attn_implementation": "eager",
        "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 32768,
        "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 8, "pad_token_id": 2,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000,
        "tie_word_embeddings": False, "vocab_size": 92553,
    },
}
INTERNVL2_1B = {
    **TOP, "template": "Hermes-2", "vision_config": VIT_300M,
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 21, "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151655,
    },
}
SHORT = [1.0 + 0.01 * i for i in range(48)]
LONG = [1.5 + 0.25 * i for i in range(48)]
INTERNVL2_4B = {
    **TOP, "template": "phi3-chat", "vision_config": VIT_300M,
    "llm_config": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "bos_token_id": 1, "eos_token_id": 32000,
        "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": LONG, "short_factor": SHORT, "type": "su"}, "rope_theta": 10000.0,
        "sliding_window": 262144, "tie_word_embeddings": False, "vocab_size": 32020,
    },
}
INTERNVL3_1B_HF = {
    "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "downsample_ratio": 0.5,
    "image_seq_length": 256, "image_token_id": 151667, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "torch_dtype": "bfloat16",
    "text_config": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 70,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False,
        "vocab_size": 151674, "tie_word_embeddings": True,
    },
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "internvl_vision", "attention_bias": True,
        "hidden_act": "gelu", "hidden_size": 1024, "image_size": [448, 448], "intermediate_size": 4096,
        "layer_norm_eps": 1e-06, "layer_scale_init_value": 0.1, "norm_type": "layer_norm",
        "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": [14, 14],
        "use_absolute_position_embeddings": True, "use_mask_token": False, "use_mean_pooling": True,
        "use_qk_norm": False,
    },
}


def write_config(d: Path, config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_parse_internvl2_2b(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, INTERNVL2_2B))
    ref = SHAPES["internvl2-2b"]
    assert cfg.vision == ref.vision
    assert replace(cfg.llm, rope_scaling=None) == ref.llm
    assert cfg.llm.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    assert (cfg.template, cfg.max_dynamic_patch, cfg.min_dynamic_patch, cfg.use_thumbnail) == (
        "internlm2-chat", 12, 1, True,
    )
    assert (cfg.ps_version, cfg.select_layer, cfg.downsample_ratio, cfg.tokens_per_tile) == ("v2", -1, 0.5, 256)


def test_parse_internvl2_1b_qwen2(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, INTERNVL2_1B))
    assert cfg.llm == SHAPES["internvl2-1b"].llm
    assert cfg.llm.qkv_bias and cfg.llm.tie_word_embeddings and cfg.llm.rope_scaling is None
    assert cfg.template == "Hermes-2"


def test_parse_internvl2_4b_phi3_longrope(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, INTERNVL2_4B))
    assert replace(cfg.llm, rope_scaling=None) == SHAPES["internvl2-4b"].llm
    assert cfg.llm.rope_scaling == {
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 4096,
    }
    assert cfg.template == "phi3-chat"


def test_parse_transformers_v5_rope_parameters(tmp_path: Path) -> None:
    llm = {k: v for k, v in INTERNVL2_4B["llm_config"].items() if k not in ("rope_scaling", "rope_theta")}
    llm["rope_parameters"] = {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
        "partial_rotary_factor": 1.0, "original_max_position_embeddings": 4096,
    }
    cfg = load_config(write_config(tmp_path, {**INTERNVL2_4B, "llm_config": llm}))
    assert cfg.llm.rope_theta == 10000.0
    assert cfg.llm.rope_scaling["rope_type"] == "longrope" and cfg.llm.rope_scaling["long_factor"] == LONG


def test_parse_internvl3_1b_hf(tmp_path: Path) -> None:
    write_config(tmp_path, INTERNVL3_1B_HF)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_to_patches": True, "max_patches": 6}))
    cfg = load_config(tmp_path)
    assert cfg.vision == SHAPES["internvl2-1b"].vision
    assert cfg.llm == replace(SHAPES["internvl2-1b"].llm, vocab_size=151674)
    assert (cfg.template, cfg.max_dynamic_patch, cfg.use_thumbnail, cfg.ps_version) == ("internvl2_5", 6, True, "v2")


def test_parse_hf_v5_text_config(tmp_path: Path) -> None:
    text = {k: v for k, v in INTERNVL3_1B_HF["text_config"].items() if k not in ("rope_scaling", "rope_theta")}
    text |= {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "model_type": "llama", "head_dim": 128}
    cfg = load_config(write_config(tmp_path, {**INTERNVL3_1B_HF, "text_config": text}))
    assert (cfg.llm.arch, cfg.llm.rope_theta, cfg.llm.rope_scaling, cfg.llm.head_dim) == ("llama", 5e5, None, 128)
    assert not cfg.llm.qkv_bias
    assert cfg.max_dynamic_patch == 12  # no preprocessor_config.json: transformers' default


@pytest.mark.parametrize(
    "preprocessor",
    [{"crop_to_patches": True, "min_patches": 2, "max_patches": 6}, {"crop_to_patches": True, "max_patches": 3},
     {"crop_to_patches": False, "max_patches": 6}],
)
def test_hf_tiling_follows_preprocessor_config(tmp_path: Path, preprocessor: dict) -> None:
    """A -hf checkpoint tiles as transformers' image processor reads the same preprocessor_config.json."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    write_config(tmp_path, INTERNVL3_1B_HF)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 448, "width": 448}, **preprocessor}
    ))
    tiling = TilingOptions.from_config(load_config(tmp_path))
    theirs = GotOcr2ImageProcessorPil.from_pretrained(str(tmp_path))
    for width, height in [(448, 448), (1000, 700), (5000, 20), (300, 2000)]:
        image = Image.new("RGB", (width, height))
        expected = int(theirs(images=image, return_tensors="np")["num_patches"][0])
        assert tiling.num_tiles(width, height) == expected, (width, height)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({**INTERNVL2_1B, "llm_config": {**INTERNVL2_1B["llm_config"], "architectures": ["Qwen3ForCausalLM"]}},
         "Qwen3ForCausalLM"),
        ({**INTERNVL3_1B_HF, "text_config": {**INTERNVL3_1B_HF["text_config"], "model_type": "qwen3"}}, "qwen3"),
        ({**INTERNVL2_1B, "llm_config": {**INTERNVL2_1B["llm_config"], "rope_scaling": {"type": "yarn", "factor": 4}}},
         "yarn"),
        ({**INTERNVL2_2B, "llm_config": {**INTERNVL2_2B["llm_config"], "bias": True}}, "bias"),
        ({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}, "llava"),
        ({**INTERNVL2_2B, "downsample_ratio": 0.25}, "downsample_ratio"),
    ],
)
def test_unsupported_configs(tmp_path: Path, config: dict, needle: str) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        load_config(write_config(tmp_path, config))


def test_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Weight conversion


def small_cfg(arch: str = "internlm2", *, tie: bool = False, vit6b: bool = False, vocab_size: int = 50) -> ModelConfig:
    vision = VisionConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    if vit6b:
        vision = replace(vision, qkv_bias=False, qk_norm=True, norm_type="rms_norm")
    scaling = None
    if arch == "phi3":
        scaling = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                   "original_max_position_embeddings": 64}
    return ModelConfig(
        vision=vision,
        llm=LLMConfig(
            arch=arch, vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=4 if arch == "phi3" else 2, qkv_bias=arch == "qwen2", tie_word_embeddings=tie,
            rope_scaling=scaling, max_position_embeddings=256,
        ),
        template="internlm2-chat", max_dynamic_patch=6,
    )


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("arch", "tie"), [("internlm2", False), ("qwen2", True), ("qwen2", False), ("llama", False),
                                           ("phi3", False)])
def test_original_layout_round_trip(tmp_path: Path, arch: str, tie: bool) -> None:
    cfg = small_cfg(arch, tie=tie)
    state = random_state_dict(cfg, seed=1)
    save_original_layout(state, cfg, tmp_path, llm_arch=arch)
    parsed = load_config(tmp_path)
    assert parsed.llm == cfg.llm and parsed.vision == cfg.vision
    assert_same_state(load_state_dict(tmp_path, parsed), state)


def test_original_key_names(tmp_path: Path) -> None:
    names = {}
    for arch in ("internlm2", "qwen2", "phi3"):
        cfg = small_cfg(arch)
        save_original_layout(random_state_dict(cfg, seed=0), cfg, tmp_path / arch, llm_arch=arch)
        names[arch] = set(load_file(tmp_path / arch / "model.safetensors"))
    assert {"language_model.model.tok_embeddings.weight", "language_model.output.weight",
            "language_model.model.layers.1.feed_forward.w3.weight", "vision_model.encoder.layers.0.ls1",
            "mlp1.3.bias"} <= names["internlm2"]
    assert {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            "language_model.model.layers.0.self_attn.k_proj.bias", "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.model.layers.0.post_attention_layernorm.weight"} <= names["qwen2"]
    assert {"language_model.model.layers.0.self_attn.qkv_proj.weight",
            "language_model.model.layers.0.mlp.gate_up_proj.weight"} <= names["phi3"]


def test_internlm2_grouped_wqkv_layout(tmp_path: Path) -> None:
    """Stored wqkv rows: for each kv head, its g query heads, then its key head, then its value head."""
    cfg = small_cfg("internlm2")
    m = cfg.llm
    state = random_state_dict(cfg, seed=2)
    save_original_layout(state, cfg, tmp_path, llm_arch="internlm2")
    stored = load_file(tmp_path / "model.safetensors")
    hd, g = m.head_dim, m.num_heads // m.num_kv_heads
    for name in ("weight",):
        grouped = stored[f"language_model.model.layers.0.attention.wqkv.{name}"]
        canon = state[f"language_model.layers.0.attention.wqkv.{name}"]
        q_end, k_end = m.num_heads * hd, (m.num_heads + m.num_kv_heads) * hd
        for h in range(m.num_heads):
            block = (h // g) * (g + 2) + h % g
            assert torch.equal(grouped[block * hd:(block + 1) * hd], canon[h * hd:(h + 1) * hd])
        for j in range(m.num_kv_heads):
            k_block, v_block = j * (g + 2) + g, j * (g + 2) + g + 1
            assert torch.equal(grouped[k_block * hd:(k_block + 1) * hd], canon[q_end + j * hd:q_end + (j + 1) * hd])
            assert torch.equal(grouped[v_block * hd:(v_block + 1) * hd], canon[k_end + j * hd:k_end + (j + 1) * hd])
    w1 = stored["language_model.model.layers.0.feed_forward.w1.weight"]
    assert torch.equal(w1, state["language_model.layers.0.feed_forward.w13.weight"][: m.intermediate_size])


@pytest.mark.parametrize(("arch", "tie", "vit6b"), [("internlm2", False, False), ("qwen2", True, True),
                                                    ("phi3", False, False)])
def test_hf_layout_round_trip(tmp_path: Path, arch: str, tie: bool, vit6b: bool) -> None:
    cfg = small_cfg(arch, tie=tie, vit6b=vit6b)
    state = random_state_dict(cfg, seed=3)
    save_hf_layout(state, cfg, tmp_path)
    parsed = load_config(tmp_path)
    expected_arch = "llama" if arch == "internlm2" else arch
    assert parsed.llm == replace(cfg.llm, arch=expected_arch) and parsed.vision == cfg.vision
    assert (parsed.max_dynamic_patch, parsed.template) == (6, "phi3-chat" if arch == "phi3" else "internvl2_5")
    assert_same_state(load_state_dict(tmp_path, parsed), state)


def test_hf_layout_old_key_names(tmp_path: Path) -> None:
    """-hf files written before transformers 4.52 name the parts without the ``model.`` level."""
    cfg = small_cfg("qwen2")
    state = random_state_dict(cfg, seed=4)
    save_hf_layout(state, cfg, tmp_path)
    renames = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]
    stored = load_file(tmp_path / "model.safetensors")
    old = {}
    for key, t in stored.items():
        new = next((n + key[len(o):] for o, n in renames if key.startswith(o)), key)
        old[new] = t
    assert "vision_tower.encoder.layer.0.attention.q_proj.weight" in old
    save_file(old, tmp_path / "model.safetensors")
    assert_same_state(load_state_dict(tmp_path, load_config(tmp_path)), state)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    cfg = small_cfg("qwen2")
    state = random_state_dict(cfg, seed=5)
    save_original_layout(state, cfg, tmp_path, llm_arch="qwen2", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    assert_same_state(load_state_dict(tmp_path, load_config(tmp_path), dtype=torch.bfloat16),
                      {k: v.to(torch.bfloat16) for k, v in state.items()})


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    cfg = small_cfg("internlm2")
    save_original_layout(random_state_dict(cfg, seed=6), cfg, tmp_path, llm_arch="internlm2")
    file = tmp_path / "model.safetensors"
    _rewrite(file, lambda t: t.update({"vision_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"1 unexpected tensors \(vision_model\.extra\.weight\)"):
        load_state_dict(tmp_path, cfg)
    _rewrite(file, lambda t: [t.pop("vision_model.extra.weight"), t.pop("language_model.model.norm.weight")])
    with pytest.raises(ModelLoadError, match=r"1 tensors missing \(language_model\.model\.norm\.weight\)"):
        load_state_dict(tmp_path, cfg)


def test_shape_mismatch(tmp_path: Path) -> None:
    cfg = small_cfg("llama")
    save_original_layout(random_state_dict(cfg, seed=7), cfg, tmp_path, llm_arch="llama")
    wrong = replace(cfg, llm=replace(cfg.llm, intermediate_size=40))
    with pytest.raises(ModelLoadError, match=r"feed_forward\.w(13|2)\.weight has shape"):
        load_state_dict(tmp_path, wrong)


def test_stored_head_unties(tmp_path: Path) -> None:
    """A config that ties the LM head while the file stores one: the stored head is used (as transformers v5)."""
    cfg = small_cfg("qwen2")
    save_original_layout(random_state_dict(cfg, seed=8), cfg, tmp_path, llm_arch="qwen2")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["llm_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert not load_config(tmp_path).llm.tie_word_embeddings


def test_pickle_only_checkpoint(tmp_path: Path) -> None:
    write_config(tmp_path, INTERNVL2_2B)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="convert them to safetensors"):
        load_state_dict(tmp_path, load_config(tmp_path))
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_state_dict(tmp_path, load_config(tmp_path))


def test_corrupt_weights(tmp_path: Path) -> None:
    cfg = small_cfg("qwen2")
    save_original_layout(random_state_dict(cfg, seed=9), cfg, tmp_path, llm_arch="qwen2")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ModelLoadError, match=r"cannot read .*model\.safetensors"):
        load_state_dict(tmp_path, cfg)


def test_canonical_shapes() -> None:
    """The shapes read off the model agree with the architecture's arithmetic; a tied head is not listed."""
    cfg = small_cfg("qwen2", tie=True, vit6b=True)
    v, m = cfg.vision, cfg.llm  # ViT: C 16, 2 layers, 1024 patches; LLM: D 32, 4 q + 2 kv heads of 8, I 48
    shapes = canonical_shapes(cfg)
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 1025, 16)
    assert shapes["vision_model.encoder.layers.1.attn.q_norm.weight"] == (16,)
    assert shapes["mlp1.1.weight"] == (32, 4 * 16)  # pixel shuffle merges 2x2 patches
    assert shapes["language_model.layers.1.attention.wqkv.weight"] == ((4 + 2 * 2) * 8, 32)
    assert shapes["language_model.layers.1.attention.wqkv.bias"] == ((4 + 2 * 2) * 8,)
    assert shapes["language_model.layers.0.feed_forward.w13.weight"] == (2 * 48, 32)
    # 4 embedding tensors, 13 per ViT-6B-style block (no qkv bias, q/k norms, RMSNorm), 6 projector tensors,
    # the token table, 7 per Qwen2 block (q/k/v bias), the final norm; no output.weight (tied).
    assert len(shapes) == 4 + 13 * v.num_layers + 6 + 1 + 7 * m.num_layers + 1
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in shapes
    assert "language_model.output.weight" not in shapes
    untied = canonical_shapes(small_cfg("internlm2"))
    assert untied["language_model.output.weight"] == (50, 32)


# ---------------------------------------------------------------------------------------------------------
# Resolving names


def test_resolve_local_and_bad_names(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ModelLoadError, match="neither an existing directory"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(tmp_path / "f.txt"))


def test_offline_hub_id_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelLoadError) as info:
        resolve_model("OpenGVLab/InternVL2-2B")
    message = str(info.value)
    assert "\n" not in message
    assert "'OpenGVLab/InternVL2-2B' is not in the local Hugging Face cache" in message
    assert "hf download OpenGVLab/InternVL2-2B" in message and "--model /path/to/checkpoint" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        resolve_model("OpenGVLab/InternVL2-2B", offline=True)


def test_hub_unreachable(tmp_path: Path) -> None:
    """A download that cannot connect (a closed local port as the hub) is a one-line error, not a traceback."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0"}
    code = "from ptp_cli.loading import resolve_model; resolve_model('OpenGVLab/InternVL2-2B')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ptp_cli.errors.ModelLoadError: cannot download model 'OpenGVLab/InternVL2-2B'"), last
    assert "hf download OpenGVLab/InternVL2-2B" in last


def test_offline_hub_id_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--OpenGVLab--InternVL2-2B"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_config(repo / "snapshots" / commit, INTERNVL2_2B)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = resolve_model("OpenGVLab/InternVL2-2B")
    assert path == repo / "snapshots" / commit
    assert load_config(path).llm.arch == "internlm2"
