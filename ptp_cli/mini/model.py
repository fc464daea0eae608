"""ptp-mini: a miniature InternVL2 (real geometry, tiny widths), its tokenizer, initial weights and export.

The checkpoint is written in OpenGVLab's original ``InternVLChatModel`` layout (InternLM2 backbone, template
``internlm2-chat``, InternVL2-2B's special tokens), so it loads through exactly the path real checkpoints take.
Depths keep ptp's default layers valid: PTP reads ViT layer 11 (the last of 12) and LLM layer 1; FastV's
layer 2 and PyramidDrop's stages (1, 2, 3) exist in a 4-layer LLM.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ptp_cli.builders.bpe import build_tiny_tokenizer
from ptp_cli.builders.writers import save_original_layout
from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.mini.shipped import SHIPPED_DIR
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.prompts import INTERNVL2_SYSTEM_MESSAGE, TEMPLATES
from ptp_cli.synth.scene import ANSWERS, COLOURS, PLURALS, SHAPES, SUFFIX, question_text
from ptp_cli.tokenization import load_tokenizer

__all__ = ["MINI", "SHIPPED_DIR", "build_mini_tokenizer", "export", "init_weights", "mini_config", "new_model", "sincos_2d"]

_VISION = VisionConfig(hidden_size=32, num_layers=12, num_heads=2, intermediate_size=128)
_LLM = LLMConfig(
    arch="internlm2", vocab_size=0, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
    num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
)
# vocab_size is the tokenizer's (see mini_config).
MINI = ModelConfig(vision=_VISION, llm=_LLM, template="internlm2-chat", max_dynamic_patch=12, name="mini")
MINI_MERGES = 700  # BPE merges: every benchmark word and the system message become a few tokens


def mini_corpus() -> str:
    """The tokenizer's training text: the chat template, the system message, every question and answer word."""
    t = TEMPLATES[MINI.template]
    lines = [t.system_template.format(system_message=INTERNVL2_SYSTEM_MESSAGE), t.user_role, t.assistant_role]
    for s in SHAPES:
        lines += [question_text("color", (s,)), question_text("count", (s,)), f"{s} {PLURALS[s]}"]
    for c in COLOURS:
        lines += [question_text("shape", (c,)), question_text("text", (c, "circle"))]
        lines += [question_text("exist", (c, s)) for s in SHAPES]
        lines += [question_text("position", (c, s, c, s)) for s in SHAPES]
    lines += [" ".join(words) for words in ANSWERS.values()]
    lines += [a for words in ANSWERS.values() for a in words]  # an answer opens the assistant's line
    lines.append(SUFFIX)
    return "\n".join(lines * 3) + "\n"


def build_mini_tokenizer(out_dir: Path) -> None:
    build_tiny_tokenizer(out_dir, corpus=mini_corpus(), num_merges=MINI_MERGES)


def mini_config(vocab_size: int, *, vit_width: int = _VISION.hidden_size) -> ModelConfig:
    """The mini shape for a tokenizer; ``vit_width`` widens the ViT (heads of 16, MLP 4x, depth unchanged)."""
    heads = max(2, vit_width // 16)
    vision = replace(MINI.vision, hidden_size=vit_width, num_heads=heads, intermediate_size=4 * vit_width)
    return replace(MINI, vision=vision, llm=replace(MINI.llm, vocab_size=vocab_size))


def new_model(tokenizer_dir: Path, *, seed: int, vit_width: int = _VISION.hidden_size) -> InternVLModel:
    """A freshly initialised, trainable ``InternVLModel`` of the mini shape (ptp's own model code)."""
    cfg = mini_config(load_tokenizer(tokenizer_dir).vocab_size, vit_width=vit_width)
    torch.manual_seed(seed)
    model = InternVLModel(cfg)
    init_weights(model)
    return model


def init_weights(model: InternVLModel) -> None:
    """Small-normal linears and embeddings, LayerScale 0.1, residual outputs scaled by depth (GPT-2 style)."""
    depth = {"vision_model": model.cfg.vision.num_layers, "language_model": model.cfg.llm.num_layers}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2"):
                p.fill_(0.1)
            elif "norm" in name or name.startswith("mlp1.0."):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif "patch_embedding" in name:
                nn.init.normal_(p, std=1 / math.sqrt(p[0].numel()))
            elif name.endswith("position_embedding"):
                # 2-D sin-cos (as MAE starts): attention knows which patches neighbour from step 0, which
                # telling shapes and glyphs apart needs; learnt further like any weight.
                p[0, 0].zero_()  # CLS
                p[0, 1:] = 0.5 * sincos_2d(model.cfg.vision.grid, p.shape[-1])
            else:
                std = 0.02
                if name.endswith(("attn.proj.weight", "mlp.fc2.weight", "attention.wo.weight", "w2.weight")):
                    std /= math.sqrt(2 * depth[name.split(".", 1)[0]])
                nn.init.normal_(p, std=std)


def mimetic_init(model: InternVLModel, *, generator: torch.Generator, qk: float = 0.7, vo: float = 0.4) -> None:
    """Mimetic initialisation of the ViT's attention (Trockman & Kolter, 2023): W_q^T W_k ~ qk (Z + I) and
    W_v^T W_proj^T ~ vo (Z - I), Z random, as in pretrained ViTs. Each patch then starts attending to patches
    like itself: an object's patches group from step 0 (the default init attends uniformly), which a small ViT
    otherwise learns slowly from little data."""
    c = model.cfg.vision.hidden_size
    eye = torch.eye(c)
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            w = layer.attn.qkv.weight  # [3C, C]: q, k, v rows
            for pair, sign in (("qk", 1.0), ("vo", -1.0)):
                scale = qk if pair == "qk" else vo
                z = torch.randn(c, c, generator=generator) / math.sqrt(c)
                u, sv, vh = torch.linalg.svd(scale * (z + sign * eye))
                root = sv.sqrt()
                if pair == "qk":  # q.k = x W_q^T W_k x^T
                    w[:c] = root[:, None] * u.T
                    w[c:2 * c] = root[:, None] * vh
                else:  # proj(v(x)) = x W_v^T W_p^T
                    w[2 * c:] = root[:, None] * u.T
                    layer.attn.proj.weight.copy_(vh.T * root[None, :])


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] row-major patch positions: sin and cos of the row, then of the column, at dim/4
    frequencies from 1 to 1/100 per patch."""
    quarter = dim // 4
    freqs = 100.0 ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang_r = rows.flatten()[:, None].float() * freqs  # [grid*grid, dim/4]
    ang_c = cols.flatten()[:, None].float() * freqs
    return torch.cat([ang_r.sin(), ang_r.cos(), ang_c.sin(), ang_c.cos()], dim=1)


def export(model: InternVLModel, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write ``model`` as an original-layout InternVL2 checkpoint (fp32 safetensors + config + tokenizer)."""
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    return save_original_layout(state, model.cfg, Path(out_dir), llm_arch="internlm2", tokenizer_dir=tokenizer_dir)
