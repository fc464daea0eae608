"""Random-weight checkpoints: the built-in ``tiny`` test model, and full-size shapes for benchmarks.

The weights are seeded and scaled so activations stay O(1) through every layer and the LM head's logits
spread out: greedy decoding then depends on the input, which tests of pruning and batching need.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ptp_cli.builders.bpe import build_tiny_tokenizer
from ptp_cli.builders.writers import save_hf_layout, save_original_layout
from ptp_cli.config import LLMConfig, ModelConfig, VisionConfig
from ptp_cli.home import TINY_VERSION, models_dir, ptp_home
from ptp_cli.loading import Layout, canonical_shapes
from ptp_cli.text.tokenization import load_tokenizer

__all__ = ["TINY", "TINY_VERSION", "build_random_checkpoint", "ensure_tiny", "ptp_home", "random_state_dict", "tiny_config"]

TINY_SEED = 0

# The built-in test model: real tiling geometry (448 px, patch 14, 256 tokens a tile), tiny widths.
# 12 ViT layers so PTP's default score layer (11) exists; 4 LLM layers so layer 1 and in-LLM drops exist;
# LLM heads 32 wide, the narrowest vLLM's CPU attention takes (--engine vllm runs the tiny model too).
TINY = ModelConfig(
    vision=VisionConfig(hidden_size=32, num_layers=12, num_heads=2, intermediate_size=64),
    llm=LLMConfig(
        arch="internlm2", vocab_size=0, hidden_size=128, intermediate_size=256, num_layers=4,
        num_heads=4, num_kv_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
        max_position_embeddings=32768,
    ),
    template="internlm2-chat",
    max_dynamic_patch=12,
    name="tiny",
)


def _init_range(name: str, shape: tuple[int, ...], *, tied: bool) -> tuple[float, float]:
    """Bounds of the uniform random init of one canonical tensor."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("ls1", "ls2")):
        return 0.1, 1.0  # LayerScale
    if "norm" in name or name.startswith("mlp1.0."):
        return (0.8, 1.2) if leaf == "weight" else (-0.03, 0.03)
    if leaf == "bias":
        return -0.03, 0.03
    if name.endswith("position_embedding"):
        std = 0.5  # patches of a flat image stay distinct
    elif name.endswith("class_embedding"):
        std = 0.2  # small next to the patches: the CLS output depends on the image
    elif name.endswith("tok_embeddings.weight"):
        std = 1.0 if not tied else shape[1] ** -0.5  # a tied table is also the LM head: logits std ~1
    else:
        std = math.prod(shape[1:]) ** -0.5  # a linear keeps the scale of its input; logits get std ~1
    half = std * 3**0.5  # uniform on [-a, a] has std a / sqrt(3)
    return -half, half


def random_state_dict(
    cfg: ModelConfig,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A canonical state dict of seeded random weights (uniform draws, ranges from ``_init_range``).

    Drawn directly in ``dtype`` on ``device``, so a full-size model (e.g. ``SHAPES["internvl2-2b"]`` in bf16 on a
    GPU) builds in seconds without touching the disk. The same seed, dtype and device give the same tensors.
    """
    if cfg.llm.vocab_size <= 0:
        raise ValueError("cfg.llm.vocab_size must be set (the tiny config leaves it to the tokenizer)")
    gen = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in canonical_shapes(cfg).items():
        low, high = _init_range(name, shape, tied=cfg.llm.tie_word_embeddings)
        state[name] = torch.empty(shape, dtype=dtype, device=device).uniform_(low, high, generator=gen)
    return state


def build_random_checkpoint(
    cfg: ModelConfig,
    out_dir: Path,
    *,
    seed: int,
    layout: Layout = "original",
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``cfg``'s shapes to ``out_dir`` (with ``cfg.llm.arch`` weights when
    ``layout="original"``). Without ``tokenizer_dir`` the tiny tokenizer is written alongside; any vocabulary at
    least as large as that tokenizer's works."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        build_tiny_tokenizer(out_dir)
        tokenizer_dir = out_dir
    state = random_state_dict(cfg, seed=seed, dtype=dtype)
    if layout == "hf":
        return save_hf_layout(state, cfg, out_dir, tokenizer_dir=tokenizer_dir)
    return save_original_layout(state, cfg, out_dir, llm_arch=cfg.llm.arch, tokenizer_dir=tokenizer_dir)


def tiny_config(vocab_size: int) -> ModelConfig:
    return replace(TINY, llm=replace(TINY.llm, vocab_size=vocab_size))


def _build_tiny(out_dir: Path) -> None:
    build_tiny_tokenizer(out_dir)
    cfg = tiny_config(load_tokenizer(out_dir).vocab_size)
    state = random_state_dict(cfg, seed=TINY_SEED, dtype=torch.float32)
    save_original_layout(state, cfg, out_dir, llm_arch="internlm2")


def ensure_tiny(*, cache_dir: Path | None = None) -> Path:
    """The built-in tiny checkpoint (InternVL2-2B layout: InternLM2 backbone, template internlm2-chat),
    built once into ``cache_dir`` (default ``$PTP_HOME/models``) and reused.

    Safe when several processes race: each builds in a private temporary folder and renames it into place;
    the first rename wins and the others discard their copy (the builds are byte-identical anyway).
    """
    root = Path(cache_dir) if cache_dir is not None else models_dir()
    final = root / TINY_VERSION
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=root))
    try:
        _build_tiny(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
