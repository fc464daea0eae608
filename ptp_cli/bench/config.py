"""What one ``ptp bench`` run measures: ``BenchConfig`` and the parsers of its list-valued options."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptp_cli.config import MAX_TILES, SHAPES
from ptp_cli.errors import UsageError
from ptp_cli.pruning import METHODS
from ptp_cli.run.devices import resolve_device, resolve_dtype


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Exactly one of ``model`` and ``shape`` is set (``shape`` when neither is given)."""

    model: str | None = None  # checkpoint dir, hub id (local cache) or "tiny": loaded with its weights
    shape: str | None = None  # a name in config.SHAPES: full-size random weights built on the device
    image_size: tuple[int, int] = (1344, 896)  # synthetic image (W, H); 1344x896 at 6 tiles: 3x2 + thumbnail
    max_tiles: int = 6  # tile cap (the paper's evaluation setting)
    batch_size: int = 32  # requests per engine / generate call
    new_tokens: int = 16  # tokens generated per request, EOS ignored
    question_tokens: int = 32  # synthetic question length (the instruction span)
    methods: tuple[str, ...] | None = None  # pruning methods; None: every registered one but "none"
    ratios: tuple[float, ...] = (0.5, 0.75)  # pruned fractions (one row only for methods that ignore it)
    vit_prunes: tuple[float, ...] = ()  # also each method that can, at each ratio, with these --vit-prune values
    warmup: int = 1  # untimed runs per row
    repeats: int = 5  # timed runs per row
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    peer: bool = True  # include the transformers row
    seed: int = 0  # synthetic image, token ids and random weights
    engine: str = "ptp"  # ptp | vllm: pre-LLM rows also run with vLLM generating ("vllm none", "vllm ptp@0.5", ...)

    @property
    def source(self) -> str:
        return self.model if self.model is not None else (self.shape or "internvl2-2b")

    def resolved_methods(self) -> tuple[str, ...]:
        return self.methods if self.methods is not None else tuple(m for m in sorted(METHODS) if m != "none")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)

    def validate(self) -> BenchConfig:
        """Raise UsageError (one line, naming the option) for anything unusable; return self."""
        if self.model is not None and self.shape is not None:
            raise UsageError("give --model or --shape, not both")
        if self.shape is not None and self.shape not in SHAPES:
            raise UsageError(f"--shape: unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        w, h = self.image_size
        checks = [
            (self.engine in ("ptp", "vllm"), f"--engine must be ptp or vllm, got {self.engine!r}"),
            (w >= 1 and h >= 1, "--image-size must be positive"),
            (1 <= self.max_tiles <= MAX_TILES, f"--max-tiles must be in 1..{MAX_TILES}"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.new_tokens >= 1, "--new-tokens must be at least 1"),
            (self.question_tokens >= 1, "--question-tokens must be at least 1"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.repeats >= 1, "--repeats must be at least 1"),
            (len(self.ratios) >= 1, "--ratios needs at least one ratio"),
            (all(0.0 <= r < 1.0 for r in self.ratios), "--ratios must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        _check_methods(self.resolved_methods())
        self.resolved_dtype(self.resolved_device())
        return self


def _check_methods(names: tuple[str, ...]) -> None:
    if unknown := [n for n in names if n not in METHODS]:
        raise UsageError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(sorted(METHODS))}")


def parse_image_size(text: str) -> tuple[int, int]:
    """'1344x896' -> (1344, 896)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--image-size must be WIDTHxHEIGHT (e.g. 1344x896), got {text!r}") from None
    if w < 1 or h < 1 or w * h > 100_000_000:
        raise UsageError(f"--image-size must be positive and at most 100 Mpixel, got {text!r}")
    return w, h


def parse_methods(text: str) -> tuple[str, ...]:
    """'ptp,fastv' -> ('ptp', 'fastv'); 'none' is always measured and so dropped here."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"))
    _check_methods(names)
    return names


def parse_ratios(text: str, *, option: str = "--ratios") -> tuple[float, ...]:
    """'0.5,0.75' -> (0.5, 0.75)."""
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"{option} must be comma-separated numbers in [0, 1), got {text!r}") from None
    if not ratios or not all(0.0 <= r < 1.0 for r in ratios):
        raise UsageError(f"{option} must be comma-separated numbers in [0, 1), got {text!r}")
    return tuple(dict.fromkeys(ratios))
