"""A tiny random-weight InternVL built in-process (real tiling geometry, tiny widths) for engine tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from ptp_cli.config import TINY
from ptp_cli.models.internvl import InternVLModel

CFG = replace(TINY, llm=replace(TINY.llm, vocab_size=300))
IMG = 299  # the image placeholder id the tests' requests use


def tiny_model(seed: int = 0) -> InternVLModel:
    """Seeded normal weights, std 0.2: large enough that greedy tokens differ between inputs."""
    model = InternVLModel(CFG)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2, generator=gen)
    return model.eval()
