"""InternVL: InternViT -> pixel shuffle -> mlp1 projector -> LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptp_cli.config import ModelConfig
from ptp_cli.models.llm import LLM
from ptp_cli.models.vit import InternViT


def pixel_shuffle(x: torch.Tensor, *, factor: int = 2, version: str = "v2") -> torch.Tensor:
    """[T, G, G, C] patch grid -> [T, G/f, G/f, C*f*f].

    Token (i, j) gathers patches (f*i + a, f*j + b) with channels ordered by (a, b) row-major; with v2 this
    is exactly InternVL's view/permute sequence. v1 (early InternVL) leaves the grid transposed.
    """
    t, g, _, c = x.shape
    x = x.view(t, g, g // factor, c * factor)  # merge column pairs: [T, rows, G/f, f*C]
    x = x.permute(0, 2, 1, 3).contiguous()  # [T, G/f, rows, f*C]
    x = x.view(t, g // factor, g // factor, c * factor * factor)  # merge row pairs: [T, G/f (cols), G/f (rows), f*f*C]
    if version == "v1":
        return x
    return x.permute(0, 2, 1, 3).contiguous()  # [T, rows/f, cols/f, f*f*C]


def pool_patch_scores(scores: torch.Tensor, *, factor: int = 2, version: str = "v2") -> torch.Tensor:
    """Per-patch scores [T, G*G] -> per-token scores [T, (G/f)^2]: each token sums its f x f patches.

    Tokens come in ``pixel_shuffle``'s order for ``version`` (v1 tokens are column-major).
    """
    t, p = scores.shape
    g = round(p**0.5)
    pooled = scores.view(t, g // factor, factor, g // factor, factor).sum(dim=(2, 4))  # [T, rows, cols]
    if version == "v1":
        pooled = pooled.transpose(1, 2)
    return pooled.flatten(1)


@dataclass
class VisionOutput:
    features: torch.Tensor  # [T, 256, D] visual tokens in the LLM's width
    cls: torch.Tensor  # [T, Cv] last-layer CLS embedding of every tile
    cls_attn: torch.Tensor | None  # [T, H, P] CLS -> patch attention per head at the asked ViT layer


class InternVLModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cv, d = cfg.vision.hidden_size, cfg.llm.hidden_size
        merged = cv * cfg.shuffle_factor**2
        self.vision_model = InternViT(cfg.vision)
        # Index 2 is the parameter-free GELU; names mlp1.{0,1,3} match the checkpoints.
        self.mlp1 = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, d), nn.GELU(), nn.Linear(d, d))
        self.language_model = LLM(cfg.llm)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a canonical state dict (see ptp_cli.loading.weights), strictly, keeping tied embeddings tied."""
        state = dict(state)
        tied = self.cfg.llm.tie_word_embeddings
        if tied:
            state.pop("language_model.output.weight", None)
            state["language_model.output.weight"] = state["language_model.tok_embeddings.weight"]
        self.load_state_dict(state, strict=True, assign=True)
        if tied:
            self.language_model.output.weight = self.language_model.tok_embeddings.weight

    def vision_features(self, pixel_values: torch.Tensor, *, cls_attn_layer: int | None = None) -> VisionOutput:
        """pixel_values [T, 3, 448, 448] -> visual tokens [T, 256, D], CLS embeddings and, with
        ``cls_attn_layer`` (0-based ViT layer), that layer's per-head CLS -> patch attention."""
        out = self.vision_model(pixel_values, select_layer=self.cfg.select_layer, cls_attn_layer=cls_attn_layer)
        t, g = out.hidden.shape[0], self.cfg.vision.grid
        grid = out.hidden[:, 1:].reshape(t, g, g, -1)  # [T, 32, 32, Cv]
        merged = pixel_shuffle(grid, factor=self.cfg.shuffle_factor, version=self.cfg.ps_version)
        features = self.mlp1(merged.flatten(1, 2))  # [T, 256, D]
        return VisionOutput(features=features, cls=out.cls, cls_attn=out.cls_attn)
