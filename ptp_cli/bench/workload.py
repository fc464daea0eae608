"""What ``ptp bench`` runs on: the model (a checkpoint, or a full-size shape with random weights) and one batch
of synthetic requests built by the same ``InputProcessor`` as ``ptp infer``'s.

The prompts need no tokenizer: a ``SyntheticEncoder`` stands in for the template step and lays out
``[bos] + system + [<img>] + [IMG] * N + [</img>] + question + suffix`` with seeded random text ids, so
full-size shapes run with random weights built on the device.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ptp_cli.bench.config import BenchConfig
from ptp_cli.builders.tiny import random_state_dict
from ptp_cli.config import SHAPES, ModelConfig
from ptp_cli.loading import build_model
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.preprocess.inputs import InputProcessor, RequestDefaults
from ptp_cli.run.engine import Request
from ptp_cli.text.prompts import PromptIds
from ptp_cli.text.tokenization import IMG_END_TOKEN, IMG_START_TOKEN, Tokenizer
from ptp_cli.zoo import load_model

SYSTEM_TOKENS = 40  # synthetic system-message length (InternVL2's Chinese system message is ~40 tokens)
SUFFIX_TOKENS = 5  # "<|im_end|><|im_start|>assistant\n"
PREPROCESS_RUNS = 3  # timed decode + tiling runs of the synthetic image (the median is reported)


@dataclass(frozen=True)
class TokenIds:
    """The special ids the synthetic prompts use, and the range their text ids come from."""

    bos: int
    img_start: int
    img_end: int
    image: int  # the visual placeholder (the peer's image_token_id)
    pad: int
    text: tuple[int, int]  # [lo, hi) of plain text ids

    @classmethod
    def for_vocab(cls, vocab_size: int) -> TokenIds:
        """Ids for a random-weight shape: the placeholders at the top of the vocabulary."""
        return cls(bos=1, img_start=vocab_size - 3, img_end=vocab_size - 2, image=vocab_size - 1, pad=0,
                   text=(16, min(vocab_size - 16, 32_000)))

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer, *, vocab_size: int, image: int) -> TokenIds:
        """A checkpoint's own special ids, falling back to ``for_vocab``'s where the tokenizer lacks one."""
        fallback = cls.for_vocab(vocab_size)
        img_start, img_end = tok.token_to_id(IMG_START_TOKEN), tok.token_to_id(IMG_END_TOKEN)
        return cls(
            bos=tok.bos_id if tok.bos_id is not None else fallback.bos,
            img_start=img_start if img_start is not None else fallback.img_start,
            img_end=img_end if img_end is not None else fallback.img_end,
            image=image, pad=tok.pad_id, text=(min(16, vocab_size // 4), min(vocab_size, 32_000)),
        )


@dataclass(frozen=True)
class SyntheticEncoder:
    """A prompt encoder (``chat_template.Prompter``) of seeded random ids: each question text gets its own ids,
    the same on every call. A fixed-length random system part stands in for the system message.
    """

    name = "synthetic"  # echoed as the template

    ids: TokenIds
    question_tokens: int  # length of the question span (what PTP's probe scores against)
    seed: int

    def encode(self, *, question: str, num_image_tokens: int) -> PromptIds:
        ids = self.ids
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(question.encode()))
        lo, hi = ids.text
        n_text = SYSTEM_TOKENS + self.question_tokens + SUFFIX_TOKENS
        special = {ids.bos, ids.img_start, ids.img_end, ids.image, ids.pad}
        text = [lo if t in special else t for t in torch.randint(lo, hi, (n_text,), generator=gen).tolist()]
        system, question_ids = text[:SYSTEM_TOKENS], text[SYSTEM_TOKENS : SYSTEM_TOKENS + self.question_tokens]
        suffix = text[SYSTEM_TOKENS + self.question_tokens :]
        head = [ids.bos, *system, ids.img_start]
        q0 = len(head) + num_image_tokens + 1
        return PromptIds(
            ids=[*head, *[ids.image] * num_image_tokens, ids.img_end, *question_ids, *suffix],
            image_start=len(head), num_image_tokens=num_image_tokens,
            instruction_start=q0, instruction_end=q0 + self.question_tokens, stop_ids=[],
        )


def synthetic_image(width: int, height: int, *, seed: int) -> Image.Image:
    """A diagonal colour gradient with seeded noise (not flat, so no method sees constant scores)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), (xs + ys) / max(width + height - 2, 1)], -1)
    noise = np.random.default_rng(seed).normal(0.0, 0.08, size=base.shape).astype(np.float32)
    return Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------------------------------------------------
# The model


@dataclass
class BenchModel:
    model: InternVLModel
    cfg: ModelConfig
    ids: TokenIds
    source: str  # "shape" | "checkpoint"


def model_config(config: BenchConfig) -> ModelConfig:
    """The model's config without building it (a checkpoint's config.json is read, no weights)."""
    if config.model is None:
        return SHAPES[config.source].with_name(config.source)
    from ptp_cli.loading import load_config
    from ptp_cli.zoo import resolve_model

    return load_config(resolve_model(config.model)).with_name(config.model)


def load_bench_model(config: BenchConfig, *, dtype: torch.dtype, device: torch.device) -> BenchModel:
    """The model under test: a checkpoint with its weights, or a shape with seeded random weights drawn in
    ``dtype`` directly on ``device`` (no disk, no fp32 copy)."""
    if config.model is None:
        cfg = model_config(config)
        model = build_model(cfg, random_state_dict(cfg, seed=config.seed, dtype=dtype, device=device))
        return BenchModel(model, cfg, TokenIds.for_vocab(cfg.llm.vocab_size), "shape")
    loaded = load_model(config.model, dtype=dtype, device=device)
    ids = TokenIds.for_tokenizer(loaded.tokenizer, vocab_size=loaded.cfg.llm.vocab_size, image=loaded.image_token_id)
    return BenchModel(loaded.model, loaded.cfg, ids, "checkpoint")


# ---------------------------------------------------------------------------------------------------------
# The requests


@dataclass(frozen=True)
class Workload:
    requests: list[Request]  # batch_size requests on the same tiles, each with its own text ids
    preprocess_s: float  # median time to decode the JPEG and tile it (one sample)

    @property
    def tiles(self) -> int:
        return self.requests[0].num_tiles

    @property
    def prompt_tokens(self) -> int:
        return len(self.requests[0].ids)


def input_processor(config: BenchConfig, cfg: ModelConfig, ids: TokenIds, *, dtype: torch.dtype,
                    retile_ratio: float | None = None) -> InputProcessor:
    """The ``InputProcessor`` of the benchmark: the model's tiling, synthetic prompts, exactly N new tokens
    (``retile_ratio``: the ``tiles`` baseline's fewer tiles)."""
    return InputProcessor(
        encoder=SyntheticEncoder(ids, question_tokens=config.question_tokens, seed=config.seed),
        tiling=TilingOptions.from_config(cfg, max_tiles=config.max_tiles), tokens_per_tile=cfg.tokens_per_tile,
        defaults=RequestDefaults(max_new_tokens=config.new_tokens, seed=config.seed, ignore_eos=True),
        pixel_dtype=dtype, retile_ratio=retile_ratio,
    )


def build_workload(config: BenchConfig, cfg: ModelConfig, ids: TokenIds, *, dtype: torch.dtype,
                   retile_ratio: float | None = None) -> Workload:
    """One synthetic JPEG, read and tiled as ``ptp infer`` reads a record's image (timed), and ``batch_size``
    requests on its tiles (fewer of them for the ``tiles`` baseline: ``retile_ratio``)."""
    processor = input_processor(config, cfg, ids, dtype=dtype, retile_ratio=retile_ratio)
    times, pixels, full = [], None, None
    with tempfile.TemporaryDirectory(prefix="ptp-bench-") as tmp:
        path = Path(tmp) / "synthetic.jpg"
        synthetic_image(*config.image_size, seed=config.seed).save(path, format="JPEG", quality=90)
        for _ in range(PREPROCESS_RUNS):
            t0 = time.perf_counter()
            pixels, full = processor.load_retiled(path, processor.tiling)  # [T, 3, 448, 448]
            times.append(time.perf_counter() - t0)
    assert pixels is not None
    requests = [processor.request(f"sample {i}", pixels) for i in range(config.batch_size)]
    for r in requests:
        r.full_tiles = full
    return Workload(requests, statistics.median(times))
