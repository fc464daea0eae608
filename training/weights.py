"""ptp-mini's initial weights (the training recipe's init) and the export of trained ones as a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ptp_cli.builders.writers import save_original_layout
from ptp_cli.mini.model import MINI, mini_config
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.text.tokenization import load_tokenizer

_VIT_WIDTH = MINI.vision.hidden_size


def new_model(tokenizer_dir: Path, *, seed: int, vit_width: int = _VIT_WIDTH) -> InternVLModel:
    """A freshly initialised, trainable ``InternVLModel`` of the mini shape (ptp's own model code).

    Seeds torch's global generator with ``seed`` first: a training run owns its process, and the read-out heads
    it builds next draw from the same stream (the shipped runs did, so their weights reproduce)."""
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
