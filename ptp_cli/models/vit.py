"""InternViT: the vision encoder of InternVL2, with a CLS-attention probe (one layer's CLS row, per head).

Parameter names follow the original InternVL2 checkpoints (``vision_model.*``) so they load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptp_cli.config import VisionConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as the reference implementations do (matters in bf16)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.norm_eps)
    if cfg.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    raise ValueError(f"unknown ViT norm_type {cfg.norm_type!r}")


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [T, 3, 448, 448] -> [T, 1 + 1024, C]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, C, 32, 32]
        x = x.flatten(2).transpose(1, 2)  # [T, 1024, C], row-major patches
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.proj = nn.Linear(c, c)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(c, cfg.norm_eps)
            self.k_norm = RMSNorm(c, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, *, cls_row: bool = False, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [T, N, C]. With ``cls_row``, also the CLS query's attention probabilities per head, [T, H, N] in
        fp32 -- computed from q of CLS alone, never the full matrix. ``key_mask`` [T, N]: the keys each tile's
        queries may see (False: padding, or patches pruned away); None: every key."""
        t, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)  # each [T, N, C]
        if self.qk_norm:  # over the full width, before the head split (InternViT-6B)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.view(t, n, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))  # [T, H, N, hd]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [T, 1, 1, N], broadcast over heads, queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [T, H, N, hd]
        row = None
        if cls_row:
            logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5  # [T, H, 1, N]
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            row = logits.softmax(-1)[:, :, 0]  # [T, H, N]
        return self.proj(out.transpose(1, 2).reshape(t, n, c)), row


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm block with LayerScale (ls1, ls2) on both residual branches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = make_norm(cfg, c)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(c))
        self.norm2 = make_norm(cfg, c)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(
        self, x: torch.Tensor, *, cls_row: bool = False, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, row = self.attn(self.norm1(x), cls_row=cls_row, key_mask=key_mask)
        x = x + a * self.ls1
        x = x + self.mlp(self.norm2(x)) * self.ls2
        return x, row


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


@dataclass
class ViTOutput:
    hidden: torch.Tensor  # [T, 1 + P, C] output of the selected layer
    cls: torch.Tensor  # [T, C] CLS output of the last layer (PTP's region embedding)
    cls_attn: torch.Tensor | None  # [T, H, P] CLS -> patch attention per head at cls_attn_layer, CLS key dropped


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(
        self,
        pixel_values: torch.Tensor,
        *,
        select_layer: int = -1,
        cls_attn_layer: int | None = None,
    ) -> ViTOutput:
        """pixel_values [T, 3, 448, 448]. ``cls_attn_layer`` (0-based) asks for the CLS attention row there."""
        x = self.embeddings(pixel_values)
        x, selected, row = self.run_layers(x, select_layer=select_layer, cls_attn_layer=cls_attn_layer)
        return ViTOutput(hidden=x if selected is None else selected, cls=x[:, 0], cls_attn=row)

    def run_layers(
        self,
        x: torch.Tensor,
        *,
        start: int = 0,
        end: int | None = None,
        select_layer: int = -1,
        cls_attn_layer: int | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encoder layers start..end-1 on x [T, N, C] (CLS first). Returns the output, the output of layer
        ``select_layer`` when it ran (else None) and the CLS -> patch row [T, H, N - 1] at ``cls_attn_layer`` when
        it ran (else None). ``key_mask`` [T, N] hides keys from every query (see ``VisionAttention``)."""
        n_layers = len(self.encoder.layers)
        select, end = select_layer % n_layers, n_layers if end is None else end
        selected, row = None, None
        for i in range(start, end):
            x, r = self.encoder.layers[i](x, cls_row=i == cls_attn_layer, key_mask=key_mask)
            if r is not None:
                row = r[:, :, 1:]  # keys: drop CLS itself, keep the patches
            if i == select:
                selected = x
        return x, selected, row
