"""ptp's model, loaded through ptp_cli.loading, against transformers' reference implementations (fp32, CPU).

Every reference is a transformers model with seeded random weights (the stock init leaves norms at 1, LayerScale
at 0.1 and embeddings at 0, which would hide mistakes). Its own weights, written in its own naming, are what
``load_model`` reads; the outputs must agree to float32 rounding.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ptp_cli.builders.tiny import random_state_dict
from ptp_cli.builders.writers import save_hf_layout, save_original_layout
from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.loading import load_model
from ptp_cli.text.tokenization import IMG_CONTEXT_TOKEN, load_tokenizer

VISION_ATOL = 1e-5
LOGITS_ATOL = 1e-4

# Small widths, real geometry: 448 px tiles, 14 px patches, 1025 positions, 256 tokens per tile.
VIT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
       "image_size": 448, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: Path) -> int:
    return load_tokenizer(tokenizer_dir).vocab_size


def randomize_(model: nn.Module, *, seed: int) -> nn.Module:
    """Seeded uniform weights at scales that keep activations O(1) and make every parameter matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda" in name:
                low, high = 0.1, 1.0  # LayerScale
            elif p.dim() == 1:
                low, high = (0.8, 1.2) if "norm" in name and name.endswith("weight") else (-0.03, 0.03)
            elif "embed_tokens" in name:
                low, high = -1.7, 1.7
            elif p.dim() == 3:  # cls token, position embeddings
                low, high = -0.9, 0.9
            else:
                a = math.sqrt(3 / math.prod(p.shape[1:]))
                low, high = -a, a
            p.uniform_(low, high, generator=gen)
    return model.eval()


def pixels(tiles: int, *, seed: int) -> torch.Tensor:
    return torch.randn(tiles, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def token_ids(vocab: int, *, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# Vision tower + projector (and the text model) against transformers' InternVL


def hf_internvl(vocab: int, *, vit6b: bool, select_layer: int, seed: int) -> InternVLForConditionalGeneration:
    vision = {**VIT, "attention_bias": not vit6b, "use_qk_norm": vit6b,
              "norm_type": "rms_norm" if vit6b else "layer_norm"}
    text = {**LLM, "model_type": "qwen2", "vocab_size": vocab, "rope_theta": 1e6, "tie_word_embeddings": False}
    config = InternVLConfig(vision_config=vision, text_config=text, vision_feature_layer=select_layer,
                            tie_word_embeddings=False, image_token_id=0)
    config._attn_implementation = "eager"
    return randomize_(InternVLForConditionalGeneration(config), seed=seed)


@pytest.mark.parametrize(("vit6b", "select_layer"), [(False, -1), (True, -2)], ids=["vit300m", "vit6b-style"])
def test_vision_and_text_vs_transformers_internvl(
    tmp_path: Path, tokenizer_dir: Path, vocab: int, vit6b: bool, select_layer: int
) -> None:
    ref = hf_internvl(vocab, vit6b=vit6b, select_layer=select_layer, seed=10)
    ref.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    ours = load_model(str(tmp_path))
    assert ours.cfg.vision.qk_norm == vit6b and ours.cfg.select_layer == select_layer
    x = pixels(2, seed=11)
    ids = token_ids(vocab, batch=2, length=24, seed=12)
    with torch.no_grad():
        expected = ref.get_image_features(pixel_values=x).pooler_output  # [T, 256, D]
        got = ours.model.vision_features(x).features
        assert expected.abs().mean() > 0.1
        assert max_diff(got, expected) < VISION_ATOL
        assert max_diff(ours.model.language_model(ids), ref(input_ids=ids).logits) < LOGITS_ATOL


def test_save_hf_layout_loads_in_transformers(tmp_path: Path, tokenizer_dir: Path, vocab: int) -> None:
    """The -hf writer, read by transformers itself: every tensor used, none left over, same outputs."""
    cfg = ModelConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        llm=LLMConfig(arch="internlm2", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2),
    )
    save_hf_layout(random_state_dict(cfg, seed=13), cfg, tmp_path, tokenizer_dir=tokenizer_dir)
    ref, info = InternVLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert ref.config.image_token_id == load_tokenizer(tokenizer_dir).token_to_id(IMG_CONTEXT_TOKEN)
    ours = load_model(str(tmp_path)).model
    x, ids = pixels(1, seed=14), token_ids(vocab, batch=2, length=16, seed=15)
    with torch.no_grad():
        assert max_diff(ours.vision_features(x).features, ref.get_image_features(pixel_values=x).pooler_output) < VISION_ATOL
        assert max_diff(ours.language_model(ids), ref.eval()(input_ids=ids).logits) < LOGITS_ATOL


# ---------------------------------------------------------------------------------------------------------
# Each LLM backbone, in the original InternVL2 layout, against its transformers model


def internlm2_from_llama(llama: LlamaForCausalLM) -> tuple[dict[str, torch.Tensor], dict]:
    """InternLM2's checkpoint naming for a Llama model (the same network). wqkv follows InternLM2's
    ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=g + 2)``: per kv head h, g query heads, its key, its value."""
    c = llama.config
    hkv, hd = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    g = c.num_attention_heads // hkv
    sd = llama.state_dict()
    out = {"language_model.model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "language_model.model.norm.weight": sd["model.norm.weight"],
           "language_model.output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        s, t = f"model.layers.{i}.", f"language_model.model.layers.{i}."
        q = sd[s + "self_attn.q_proj.weight"].view(hkv, g, hd, -1)
        k = sd[s + "self_attn.k_proj.weight"].view(hkv, 1, hd, -1)
        v = sd[s + "self_attn.v_proj.weight"].view(hkv, 1, hd, -1)
        out |= {
            t + "attention.wqkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size),
            t + "attention.wo.weight": sd[s + "self_attn.o_proj.weight"],
            t + "attention_norm.weight": sd[s + "input_layernorm.weight"],
            t + "ffn_norm.weight": sd[s + "post_attention_layernorm.weight"],
            t + "feed_forward.w1.weight": sd[s + "mlp.gate_proj.weight"],
            t + "feed_forward.w3.weight": sd[s + "mlp.up_proj.weight"],
            t + "feed_forward.w2.weight": sd[s + "mlp.down_proj.weight"],
        }
    llm_config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                  "vocab_size": c.vocab_size, "rope_theta": c.rope_parameters["rope_theta"], "rope_scaling": None,
                  "tie_word_embeddings": False, **LLM}
    return out, llm_config


def write_original(out_dir: Path, llm_state: dict[str, torch.Tensor], llm_config: dict, tokenizer_dir: Path,
                   *, template: str) -> None:
    """An InternVLChatModel checkpoint: a random ViT + projector, and the given language model."""
    cfg = ModelConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        llm=LLMConfig(vocab_size=8, hidden_size=llm_config["hidden_size"], num_layers=0),
    )
    vision = {k: v for k, v in random_state_dict(cfg, seed=20).items() if not k.startswith("language_model.")}
    save_file({**vision, **{k: v.contiguous() for k, v in llm_state.items()}}, out_dir / "model.safetensors")
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": template,
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "dynamic_image_size": True,
        "max_dynamic_patch": 6, "min_dynamic_patch": 1, "use_thumbnail": True, "force_image_size": 448,
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 448, "patch_size": 14,
                          "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
                          "layer_norm_eps": 1e-6, "hidden_act": "gelu"},
        "llm_config": llm_config,
    }
    (out_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out_dir / name)


def backbone(arch: str, vocab: int) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    """(reference model, its weights in the original InternVL layout, its llm_config)."""
    if arch == "internlm2":
        ref = LlamaForCausalLM(LlamaConfig(**LLM, vocab_size=vocab, rope_theta=1e6))
        ref.config._attn_implementation = "eager"
        randomize_(ref, seed=30)
        state, llm_config = internlm2_from_llama(ref)
        return ref, state, llm_config
    if arch == "qwen2":  # qkv bias, tied head
        ref = Qwen2ForCausalLM(Qwen2Config(**LLM, vocab_size=vocab, rope_theta=1e6, tie_word_embeddings=True))
        name = "Qwen2ForCausalLM"
    elif arch == "llama":
        ref = LlamaForCausalLM(LlamaConfig(**LLM, vocab_size=vocab, rope_theta=5e5))
        name = "LlamaForCausalLM"
    else:  # Phi-3 with longrope: short factors up to 64 positions, long factors past them
        hd = LLM["hidden_size"] // LLM["num_attention_heads"]
        scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(hd // 2)],
                   "long_factor": [1.0 + 2.0 * i for i in range(hd // 2)], "rope_theta": 1e4}
        ref = Phi3ForCausalLM(Phi3Config(**{**LLM, "num_key_value_heads": 4}, vocab_size=vocab,
                                         original_max_position_embeddings=64, rope_parameters=scaling,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
        name = "Phi3ForCausalLM"
    ref.config._attn_implementation = "eager"
    randomize_(ref, seed=31)
    tied = ref.config.tie_word_embeddings
    state = {"language_model." + k: v for k, v in ref.state_dict().items() if not (tied and k == "lm_head.weight")}
    return ref, state, {**ref.config.to_dict(), "architectures": [name]}


@pytest.mark.parametrize(
    ("arch", "length"),
    [("internlm2", 40), ("qwen2", 40), ("llama", 40), ("phi3", 40), ("phi3", 100)],
    ids=["internlm2-as-llama", "qwen2", "llama", "phi3-short-rope", "phi3-long-rope"],
)
def test_llm_logits_vs_transformers(tmp_path: Path, tokenizer_dir: Path, vocab: int, arch: str, length: int) -> None:
    ref, state, llm_config = backbone(arch, vocab)
    write_original(tmp_path, state, llm_config, tokenizer_dir, template="internlm2-chat")
    ours = load_model(str(tmp_path))
    assert ours.cfg.llm.arch == arch
    if arch == "phi3":
        assert ours.cfg.llm.rope_scaling["rope_type"] == "longrope"
    ids = token_ids(vocab, batch=2, length=length, seed=32)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        assert expected.std() > 0.5
        assert max_diff(ours.model.language_model(ids), expected) < LOGITS_ATOL


# ---------------------------------------------------------------------------------------------------------
# One model, two layouts


def test_original_and_hf_layouts_agree(tmp_path: Path, tokenizer_dir: Path, vocab: int) -> None:
    cfg = ModelConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        llm=LLMConfig(arch="internlm2", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2),
    )
    state = random_state_dict(cfg, seed=40)
    save_original_layout(state, cfg, tmp_path / "original", llm_arch="internlm2", tokenizer_dir=tokenizer_dir)
    save_hf_layout(state, cfg, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    a, b = load_model(str(tmp_path / "original")).model, load_model(str(tmp_path / "hf")).model
    x, ids = pixels(1, seed=41), token_ids(vocab, batch=2, length=12, seed=42)
    with torch.no_grad():
        assert max_diff(a.vision_features(x).features, b.vision_features(x).features) == 0.0
        assert max_diff(a.language_model(ids), b.language_model(ids)) == 0.0
