"""``ptp bench``: ptp's engine side by side with transformers' ``InternVLForConditionalGeneration.generate``.

One process, one run, the same synthetic requests for every row: the transformers peer (sdpa attention, the
same dtype, a left-padded batch), ptp without pruning, and ptp with each pruning method at each ratio. Every
row is warmed up, then timed ``repeats`` times with the device synchronised around each clock reading; the
report gives medians with min/max, per-stage times, peak device memory, analytic FLOPs, the achieved prefill
rate against a dense matmul measured in the same run, and speedups as ratios of samples/s medians.

The requests need no tokenizer: ``[bos] + system + [<img>] + [IMG] * N + [</img>] + question + suffix`` with
seeded random ids for the text, so full-size shapes run with random weights built on the device.
"""

from __future__ import annotations

import io
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import ptp_cli
from ptp_cli.builders.tiny import random_state_dict
from ptp_cli.builders.writers import save_hf_layout
from ptp_cli.config import MAX_TILES, SHAPES, ModelConfig
from ptp_cli.engine import Engine, Request, Result, sync_device
from ptp_cli.errors import UsageError
from ptp_cli.image import TilingOptions
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.pruning import METHODS, PruneConfig, make_method
from ptp_cli.tokenization import IMG_END_TOKEN, IMG_START_TOKEN
from ptp_cli.zoo import load_model

SCHEMA_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SYSTEM_TOKENS = 40  # synthetic system-message length (InternVL2's Chinese system message is ~40 tokens)
SUFFIX_TOKENS = 5  # "<|im_end|><|im_start|>assistant\n"
SHARE_WEIGHTS_MAX_PARAMS = 50_000_000  # below this the peer gets ptp's own weights (via a temporary -hf copy)
PEER = "transformers"
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------------------
# Configuration


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
    warmup: int = 1  # untimed runs per row
    repeats: int = 5  # timed runs per row
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    peer: bool = True  # include the transformers row
    seed: int = 0  # synthetic image, token ids and random weights

    @property
    def source(self) -> str:
        return self.model if self.model is not None else (self.shape or "internvl2-2b")

    def resolved_methods(self) -> tuple[str, ...]:
        return self.methods if self.methods is not None else tuple(m for m in sorted(METHODS) if m != "none")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise UsageError(f"--device: {self.device!r} is not a device (auto, cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device}: no CUDA device is available here")
        if dev.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {self.device}: only cpu and cuda are supported")
        return dev

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        name = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if name == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if name not in DTYPES:
            raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}")
        return DTYPES[name]

    def validate(self) -> BenchConfig:
        """Raise UsageError (one line, naming the option) for anything unusable; return self."""
        if self.model is not None and self.shape is not None:
            raise UsageError("give --model or --shape, not both")
        if self.shape is not None and self.shape not in SHAPES:
            raise UsageError(f"--shape: unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        w, h = self.image_size
        checks = [
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
        unknown = [m for m in self.resolved_methods() if m not in METHODS]
        if unknown:
            raise UsageError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(sorted(METHODS))}")
        self.resolved_dtype(self.resolved_device())
        return self


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
    if unknown := [n for n in names if n not in METHODS]:
        raise UsageError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(sorted(METHODS))}")
    return names


def parse_ratios(text: str) -> tuple[float, ...]:
    """'0.5,0.75' -> (0.5, 0.75)."""
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}") from None
    if not ratios or not all(0.0 <= r < 1.0 for r in ratios):
        raise UsageError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    return tuple(dict.fromkeys(ratios))


# ---------------------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Stat:
    """A measurement over the timed repeats."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class BenchRow:
    name: str  # "transformers", "none", "ptp@0.5", "vtw" (methods that ignore the ratio get one row)
    engine: str  # "transformers" | "ptp"
    method: str | None  # pruning method (None for the peer)
    ratio: float | None  # pruned fraction (None where it does not apply)
    settings: dict[str, Any]  # the method's settings
    samples_per_s: Stat  # batch_size / wall time of a whole batch
    wall_s: Stat  # one batch, end to end (device synchronised)
    ttft_s: Stat  # first token: ViT + probe + prefill (peer: a generate with max_new_tokens=1)
    stages_s: dict[str, Stat]  # per batch: vit, probe, prefill, decode (the peer has none)
    peak_memory_bytes: int | None  # peak allocated in the row, this row's weights included (CPU: None)
    visual_tokens: float  # mean visual tokens entering the LLM per sample
    flops_per_sample: dict[str, int]  # vit, probe, prefill, decode, total (peer: those of ptp none)
    prefill_tflops: Stat | None  # achieved: prefill FLOPs of the batch / prefill time
    prefill_pct_of_matmul: float | None  # median prefill rate as % of the dense matmul rate
    speedup_vs_peer: float | None = None  # samples/s median over the peer's
    speedup_vs_none: float | None = None  # samples/s median over ptp none's
    flops_ratio_vs_none: float | None = None  # total FLOPs of none / this row's


@dataclass(frozen=True)
class Check:
    name: str  # the target
    value: float | None  # what this run measured
    target: str  # the threshold, in words
    status: str  # "PASS" | "FAIL" | "n.a."
    note: str = ""  # why n.a., or what was compared


@dataclass
class BenchReport:
    config: dict[str, Any]  # the BenchConfig, with dtype and device resolved
    device: dict[str, Any]  # type, name, dense matmul rate (the better of before and after the rows)
    versions: dict[str, str]  # torch, transformers, ptp, python
    model: dict[str, Any]  # name, source, parameter counts, shape summary
    workload: dict[str, Any]  # image size, tiles, tokens per sample
    preprocess_s_per_sample: float  # decode + tile one synthetic JPEG (median of a few)
    rows: list[BenchRow]
    checks: list[Check]
    peer_tokens_match: bool | None  # peer and ptp none generated the same tokens (only with shared weights)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def row(self, name: str) -> BenchRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


# ---------------------------------------------------------------------------------------------------------
# Device helpers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name or platform.machine() or "cpu"


def matmul_tflops(device: torch.device, dtype: torch.dtype, *, trials: int = 5) -> tuple[float, int]:
    """Dense [n, n] @ [n, n] rate in TFLOP/s (2 FLOPs per multiply-add), n = 8192 on GPU and 1024 on CPU:
    the best of ``trials`` timed bursts of at least 0.1 s each (the rate the device sustains when not disturbed)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        iters, elapsed = 0, 0.0
        sync_device(device)
        start = time.perf_counter()
        while elapsed < 0.1 or iters < 2:
            a @ b
            iters += 1
            sync_device(device)
            elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 * iters / elapsed / 1e12)
    return best, n


def _weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------
# Workload


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


def synthetic_image(width: int, height: int, *, seed: int) -> Image.Image:
    """A diagonal colour gradient with seeded noise (not flat, so no method sees constant scores)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), (xs + ys) / max(width + height - 2, 1)], -1)
    noise = np.random.default_rng(seed).normal(0.0, 0.08, size=base.shape).astype(np.float32)
    return Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8), mode="RGB")


def preprocess_seconds(jpeg: bytes, tiling: TilingOptions, *, runs: int = 3) -> tuple[float, torch.Tensor]:
    """Median time to decode one JPEG and tile it, and the tiles."""
    times, pixels = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(jpeg)) as im:
            pixels = tiling.preprocess(im.convert("RGB"))
        times.append(time.perf_counter() - t0)
    assert pixels is not None
    return statistics.median(times), pixels


def build_requests(
    pixels: torch.Tensor, ids: TokenIds, *, batch_size: int, tokens_per_tile: int, question_tokens: int,
    new_tokens: int, seed: int,
) -> list[Request]:
    """``batch_size`` requests on the same tiles, each with its own seeded system/question/suffix ids."""
    gen = torch.Generator().manual_seed(seed)
    special = {ids.bos, ids.img_start, ids.img_end, ids.image, ids.pad}
    lo, hi = ids.text
    n_visual = pixels.shape[0] * tokens_per_tile
    requests = []
    for i in range(batch_size):
        text = [t for t in torch.randint(lo, hi, (SYSTEM_TOKENS + question_tokens + SUFFIX_TOKENS,), generator=gen)
                .tolist()]
        text = [lo if t in special else t for t in text]
        system, question = text[:SYSTEM_TOKENS], text[SYSTEM_TOKENS : SYSTEM_TOKENS + question_tokens]
        suffix = text[SYSTEM_TOKENS + question_tokens :]
        prompt = [ids.bos, *system, ids.img_start, *[ids.image] * n_visual, ids.img_end, *question, *suffix]
        q0 = 1 + SYSTEM_TOKENS + 1 + n_visual + 1
        requests.append(Request(
            ids=prompt, pixel_values=pixels, image_start=1 + SYSTEM_TOKENS + 1, instruction=(q0, q0 + question_tokens),
            max_new_tokens=new_tokens, seed=seed + i, has_thumbnail=pixels.shape[0] > 1, ignore_eos=True,
        ))
    return requests


# ---------------------------------------------------------------------------------------------------------
# Models


@dataclass
class _Loaded:
    model: InternVLModel
    cfg: ModelConfig
    ids: TokenIds
    source: str  # "shape" | "checkpoint"


def random_model(cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device, seed: int) -> InternVLModel:
    """A full-size model with seeded random weights drawn in ``dtype`` on ``device`` (no disk, no fp32 copy)."""
    state = random_state_dict(cfg, seed=seed, dtype=dtype, device=device)
    with torch.device("meta"):
        model = InternVLModel(cfg)
    model.load_weights(state)
    return model.eval().requires_grad_(False)


def load_ptp(config: BenchConfig, *, dtype: torch.dtype, device: torch.device) -> _Loaded:
    if config.model is None:
        name = config.source
        cfg = SHAPES[name].with_name(name)
        model = random_model(cfg, dtype=dtype, device=device, seed=config.seed)
        return _Loaded(model, cfg, TokenIds.for_vocab(cfg.llm.vocab_size), "shape")
    loaded = load_model(config.model, dtype=dtype, device=device)
    tok, vocab = loaded.tokenizer, loaded.cfg.llm.vocab_size
    img_start, img_end = tok.token_to_id(IMG_START_TOKEN), tok.token_to_id(IMG_END_TOKEN)
    fallback = TokenIds.for_vocab(vocab)
    ids = TokenIds(
        bos=tok.bos_id if tok.bos_id is not None else fallback.bos,
        img_start=img_start if img_start is not None else fallback.img_start,
        img_end=img_end if img_end is not None else fallback.img_end,
        image=loaded.image_token_id, pad=tok.pad_id, text=(min(16, vocab // 4), min(vocab, 32_000)),
    )
    return _Loaded(loaded.model, loaded.cfg, ids, "checkpoint")


def peer_config(cfg: ModelConfig, *, image_token_id: int) -> Any:
    """transformers' InternVLConfig with the same sizes (InternLM2 is Llama-architecture).

    RoPE scaling is left out: it changes no shape and no cost at these lengths.
    """
    from transformers import InternVLConfig, LlamaConfig, Phi3Config, Qwen2Config

    m, v = cfg.llm, cfg.vision
    common = dict(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps, hidden_act=m.hidden_act,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if m.arch in ("internlm2", "llama"):
        text = LlamaConfig(**common, head_dim=m.head_dim, attention_bias=m.qkv_bias, mlp_bias=False)
    elif m.arch == "qwen2":
        text = Qwen2Config(**common, use_sliding_window=False)
    else:
        text = Phi3Config(**common, original_max_position_embeddings=m.max_position_embeddings)
    vision = dict(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, hidden_act=v.hidden_act, attention_bias=v.qkv_bias,
        use_qk_norm=v.qk_norm, norm_type=v.norm_type, layer_norm_eps=v.norm_eps,
        image_size=[v.image_size, v.image_size], patch_size=[v.patch_size, v.patch_size],
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=cfg.tokens_per_tile, downsample_ratio=cfg.downsample_ratio,
        vision_feature_layer=cfg.select_layer, tie_word_embeddings=m.tie_word_embeddings,
    )


def build_peer(loaded: _Loaded, *, dtype: torch.dtype, device: torch.device, share_weights: bool) -> Any:
    """The peer on ``device`` in ``dtype``: ptp's own weights (small models), else transformers' random init."""
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    config = peer_config(loaded.cfg, image_token_id=loaded.ids.image)
    with torch.device("meta"):
        peer = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    peer.to_empty(device=device)
    peer.initialize_weights()  # normal(0, 0.02) weights, and the non-persistent RoPE buffers
    if share_weights:
        with tempfile.TemporaryDirectory(prefix="ptp-bench-") as tmp:
            save_hf_layout({k: v.float().cpu() for k, v in loaded.model.state_dict().items()}, loaded.cfg, Path(tmp))
            state = load_file(str(Path(tmp) / "model.safetensors"))
        peer.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True)
    peer.tie_weights()
    return peer.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# Measuring: every row is warmed up, then timed in rounds (round k runs each row once, starting one row later
# than round k-1), so drift in the machine's speed (clocks, other tenants) spreads over all rows alike.


class _PeakMemory:
    """Peak device memory of one row over its runs, counting its own weights but not another model held too."""

    def __init__(self, device: torch.device, own_weights: int) -> None:
        self.device = device
        self.own = own_weights
        self.peak: int | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            sync_device(self.device)
            self.other = torch.cuda.memory_allocated(self.device) - self.own
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync_device(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.other
            self.peak = peak if self.peak is None else max(self.peak, peak)


class _PtpRunner:
    def __init__(self, name: str, engine: Engine, requests: list[Request], *, device: torch.device,
                 own_weights: int, ratio: float | None) -> None:
        self.name, self.engine, self.requests, self.device, self.ratio = name, engine, requests, device, ratio
        self.memory = _PeakMemory(device, own_weights)
        self.walls: list[float] = []
        self.timings: list[dict[str, float]] = []
        self.results: list[Result] = []

    def warm(self) -> None:
        with self.memory:
            self.engine.generate(self.requests)

    def measure(self) -> None:
        with self.memory:
            sync_device(self.device)
            t0 = time.perf_counter()
            self.results = self.engine.generate(self.requests)
            sync_device(self.device)
            self.walls.append(time.perf_counter() - t0)
        self.timings.append(self.results[0].timing)

    def row(self, *, matmul: float) -> BenchRow:
        b, results, timings = len(self.requests), self.results, self.timings
        rates = [sum(r.flops["prefill"] for r in results) / t["prefill"] / 1e12 for t in timings if t.get("prefill")]
        rate = Stat.of(rates) if rates else None
        method = self.engine.method
        return BenchRow(
            name=self.name, engine="ptp", method=method.name, ratio=self.ratio, settings=method.settings(),
            samples_per_s=Stat.of([b / w for w in self.walls]), wall_s=Stat.of(self.walls),
            ttft_s=Stat.of([t.get("vit", 0.0) + t.get("probe", 0.0) + t.get("prefill", 0.0) for t in timings]),
            stages_s={k: Stat.of([t.get(k, 0.0) for t in timings]) for k in ("vit", "probe", "prefill", "decode")},
            peak_memory_bytes=self.memory.peak,
            visual_tokens=statistics.fmean(r.visual_after for r in results),
            flops_per_sample={k: round(statistics.fmean(r.flops[k] for r in results)) for k in results[0].flops},
            prefill_tflops=rate, prefill_pct_of_matmul=100 * rate.median / matmul if rate and matmul > 0 else None,
        )


class _PeerRunner:
    """transformers' generate on the requests as one left-padded batch; TTFT from a max_new_tokens=1 call."""

    name = PEER

    def __init__(self, peer: Any, requests: list[Request], *, pad: int, new_tokens: int, device: torch.device,
                 dtype: torch.dtype, own_weights: int, visual_tokens: int) -> None:
        s = max(len(r.ids) for r in requests)
        ids = torch.full((len(requests), s), pad, dtype=torch.long)
        mask = torch.zeros(len(requests), s, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, s - len(r.ids) :] = torch.tensor(r.ids)
            mask[i, s - len(r.ids) :] = 1
        self.inputs = dict(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            pixel_values=torch.cat([r.pixel_values for r in requests]).to(device, dtype),  # [sum T, 3, 448, 448]
        )
        self.peer, self.pad, self.new_tokens, self.device = peer, pad, new_tokens, device
        self.visual_tokens = visual_tokens
        self.memory = _PeakMemory(device, own_weights)
        self.walls: list[float] = []
        self.ttfts: list[float] = []
        self.tokens: list[list[int]] = []

    def _generate(self, n: int) -> torch.Tensor:
        out = self.peer.generate(
            **self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.pad,
        )
        generated = out[:, self.inputs["input_ids"].shape[1] :]  # [B, n]
        if generated.shape[1] != n:
            raise RuntimeError(f"transformers generated {generated.shape[1]} tokens, expected {n}")
        return generated

    def _timed(self, n: int) -> tuple[float, torch.Tensor]:
        sync_device(self.device)
        t0 = time.perf_counter()
        out = self._generate(n)
        sync_device(self.device)
        return time.perf_counter() - t0, out

    def warm(self) -> None:
        with self.memory:
            self._generate(1)
            self._generate(self.new_tokens)

    def measure(self) -> None:
        with self.memory:
            self.ttfts.append(self._timed(1)[0])
            wall, tokens = self._timed(self.new_tokens)
        self.walls.append(wall)
        self.tokens = tokens.tolist()

    def row(self, *, matmul: float) -> BenchRow:
        b = len(self.tokens)
        return BenchRow(
            name=PEER, engine="transformers", method=None, ratio=None, settings={"attn_implementation": "sdpa"},
            samples_per_s=Stat.of([b / w for w in self.walls]), wall_s=Stat.of(self.walls),
            ttft_s=Stat.of(self.ttfts), stages_s={}, peak_memory_bytes=self.memory.peak,
            visual_tokens=float(self.visual_tokens), flops_per_sample={}, prefill_tflops=None,
            prefill_pct_of_matmul=None,
        )


@torch.inference_mode()
def _measure(runners: Sequence[_PtpRunner | _PeerRunner], *, warmup: int, repeats: int,
             say: Callable[[str], None]) -> None:
    for runner in runners:
        say(f"warm-up {runner.name}")
        for _ in range(warmup):
            runner.warm()
    for k in range(repeats):
        say(f"round {k + 1}/{repeats}")
        for i in range(len(runners)):
            runners[(i + k) % len(runners)].measure()


# ---------------------------------------------------------------------------------------------------------
# The targets (InternVL2-2B shape, bf16, 6 tiles + thumbnail, batch 32, 16 new tokens, one H100)


def _checks(report_rows: list[BenchRow], *, config: BenchConfig, dtype: torch.dtype, device: torch.device,
            tiles: int) -> list[Check]:
    rows = {r.name: r for r in report_rows}
    on_target = (config.source == "internvl2-2b" and dtype == torch.bfloat16 and device.type == "cuda")
    main = on_target and tiles == 7 and config.batch_size == 32 and config.new_tokens == 16
    big = on_target and tiles >= 13 and config.batch_size >= 64
    why = "" if main else "target setup: --shape internvl2-2b, bf16, cuda, 6 tiles + thumbnail, batch 32, 16 tokens"
    none, ptp = rows.get("none"), rows.get("ptp@0.5")

    def check(name: str, value: float | None, ok: Callable[[float], bool], target: str, applies: bool,
              note: str) -> Check:
        if value is None:
            return Check(name, None, target, "n.a.", "not measured in this run")
        return Check(name, value, target, ("PASS" if ok(value) else "FAIL") if applies else "n.a.", note)

    out = [
        check("ptp none speedup over transformers", none.speedup_vs_peer if none else None,
              lambda v: v >= 1.5, ">= 1.5x", main, why),
        check("ptp ratio 0.5 speedup over transformers", ptp.speedup_vs_peer if ptp else None,
              lambda v: v >= 2.5, ">= 2.5x", main, why),
    ]
    eff = None
    if ptp and ptp.speedup_vs_none and ptp.flops_ratio_vs_none:
        eff = ptp.speedup_vs_none / ptp.flops_ratio_vs_none
    out.append(check("ptp ratio 0.5 speedup over none / FLOPs ratio", eff, lambda v: v >= 0.9, ">= 0.9", main,
                     why or (f"speedup {ptp.speedup_vs_none:.2f}x vs FLOPs ratio {ptp.flops_ratio_vs_none:.2f}x"
                             if ptp and eff is not None else "")))
    out.append(check("ptp none prefill, % of dense matmul rate", none.prefill_pct_of_matmul if none else None,
                     lambda v: v >= 50, ">= 50%", main, why))
    share = None
    if ptp:
        share = 100 * ptp.stages_s["probe"].median / ptp.wall_s.median
    out.append(check("PTP scoring (probe + selection), % of request time", share, lambda v: v <= 10, "<= 10%",
                     main, why))
    peaks = [r.peak_memory_bytes for r in report_rows if r.engine == "ptp" and r.peak_memory_bytes is not None]
    out.append(check("ptp peak memory (GiB), every ptp row", max(peaks) / GIB if peaks else None,
                     lambda v: v <= 40, "<= 40 GiB", big,
                     "" if big else "target setup: internvl2-2b, bf16, cuda, 12 tiles + thumbnail, batch >= 64"))
    return out


# ---------------------------------------------------------------------------------------------------------
# Entry point


def _row_plan(config: BenchConfig, cfg: ModelConfig) -> list[tuple[str, PruneConfig]]:
    """(row name, settings) of every ptp row: none, then each method at each ratio (once if it ignores it)."""
    plan = [("none", PruneConfig(method="none"))]
    for name in config.resolved_methods():
        per_ratio = [PruneConfig(method=name, ratio=r) for r in config.ratios]
        if "ratio" not in make_method(per_ratio[0], cfg).settings():
            plan.append((name, per_ratio[0]))
        else:
            plan.extend((f"{name}@{r:g}", p) for r, p in zip(config.ratios, per_ratio, strict=True))
    return plan


def run_bench(config: BenchConfig, *, log: Callable[[str], None] | None = None) -> BenchReport:
    """Run every row of ``config`` in this process and return the report."""
    import transformers

    config.validate()
    say = log or (lambda _msg: None)
    device = config.resolved_device()
    dtype = config.resolved_dtype(device)
    torch.manual_seed(config.seed)

    say(f"loading {config.source} ({str(dtype).removeprefix('torch.')} on {device})")
    loaded = load_ptp(config, dtype=dtype, device=device)
    cfg = loaded.cfg
    plan = _row_plan(config, cfg)  # validates every method against the model before anything is timed
    tiling = TilingOptions.from_config(cfg, max_tiles=config.max_tiles)
    w, h = config.image_size
    buf = io.BytesIO()
    synthetic_image(w, h, seed=config.seed).save(buf, format="JPEG", quality=90)
    pre_s, pixels = preprocess_seconds(buf.getvalue(), tiling)
    tiles = int(pixels.shape[0])
    requests = build_requests(
        pixels, loaded.ids, batch_size=config.batch_size, tokens_per_tile=cfg.tokens_per_tile,
        question_tokens=config.question_tokens, new_tokens=config.new_tokens, seed=config.seed,
    )
    say(f"{tiles} tiles per image ({'with' if tiles > 1 else 'no'} thumbnail), {len(requests[0].ids)} prompt tokens")

    matmul_before, matmul_n = matmul_tflops(device, dtype)
    say(f"dense matmul {matmul_n}^3: {matmul_before:.2f} TFLOP/s")
    ptp_weights = _weights_bytes(loaded.model)
    n_params = sum(p.numel() for p in loaded.model.parameters())

    runners: list[_PtpRunner | _PeerRunner] = []
    share = config.peer and n_params <= SHARE_WEIGHTS_MAX_PARAMS
    if config.peer:
        peer = build_peer(loaded, dtype=dtype, device=device, share_weights=share)
        runners.append(_PeerRunner(
            peer, requests, pad=loaded.ids.pad, new_tokens=config.new_tokens, device=device, dtype=dtype,
            own_weights=_weights_bytes(peer), visual_tokens=tiles * cfg.tokens_per_tile,
        ))
    for name, prune in plan:
        method = make_method(prune, cfg)
        runners.append(_PtpRunner(
            name, Engine(loaded.model, image_token_id=loaded.ids.image, method=method), requests, device=device,
            own_weights=ptp_weights, ratio=prune.ratio if "ratio" in method.settings() else None,
        ))
    _measure(runners, warmup=config.warmup, repeats=config.repeats, say=say)
    matmul_after, _ = matmul_tflops(device, dtype)  # again after the rows: the better of the two is the rate
    matmul = max(matmul_before, matmul_after)
    rows = [r.row(matmul=matmul) for r in runners]
    peer_match = None
    if share:
        none_tokens = [r.tokens for r in next(r for r in runners if r.name == "none").results]
        peer_match = none_tokens == runners[0].tokens

    none = next(r for r in rows if r.name == "none")
    peer_row = rows[0] if config.peer else None
    if peer_row is not None:
        peer_row.flops_per_sample = dict(none.flops_per_sample)
    for r in rows:
        if peer_row is not None:
            r.speedup_vs_peer = r.samples_per_s.median / peer_row.samples_per_s.median
        r.speedup_vs_none = r.samples_per_s.median / none.samples_per_s.median
        if r.flops_per_sample.get("total"):
            r.flops_ratio_vs_none = none.flops_per_sample["total"] / r.flops_per_sample["total"]

    grid = tiles - 1 if tiles > 1 and cfg.use_thumbnail else tiles
    resolved = {**asdict(config), "source": config.source, "methods": list(config.resolved_methods()),
                "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    return BenchReport(
        config=resolved,
        device={"type": device.type, "name": device_name(device), "matmul_tflops": matmul, "matmul_size": matmul_n,
                "matmul_tflops_before_after": [matmul_before, matmul_after]},
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "ptp": ptp_cli.__version__,
                  "python": platform.python_version()},
        model={"name": cfg.name or config.source, "source": loaded.source, "params": n_params,
               "weights_bytes": ptp_weights, "llm_arch": cfg.llm.arch, "llm_layers": cfg.llm.num_layers,
               "llm_hidden": cfg.llm.hidden_size, "vit_layers": cfg.vision.num_layers,
               "peer_weights": ("shared" if share else "random") if config.peer else None},
        workload={"image_size": [w, h], "tiles": tiles, "grid_tiles": grid, "thumbnail": tiles > grid,
                  "visual_tokens": tiles * cfg.tokens_per_tile, "prompt_tokens": len(requests[0].ids),
                  "question_tokens": config.question_tokens, "batch_size": config.batch_size,
                  "new_tokens": config.new_tokens},
        preprocess_s_per_sample=pre_s,
        rows=rows,
        checks=_checks(rows, config=config, dtype=dtype, device=device, tiles=tiles),
        peer_tokens_match=peer_match,
    )


# ---------------------------------------------------------------------------------------------------------
# Text table


def _ms(s: Stat | None) -> str:
    return "-" if s is None else f"{1e3 * s.median:.1f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(report: BenchReport) -> str:
    """A readable table of the rows, then the context and the issue's checks."""
    wl, dev, c = report.workload, report.device, report.config
    tiles = f"{wl['tiles']} tiles ({wl['grid_tiles']} + thumbnail)" if wl["thumbnail"] else f"{wl['tiles']} tile(s)"
    head = [
        f"ptp bench: {report.model['name']} ({_params(report.model['params'])} params, {c['dtype']}) on "
        f"{dev['name']} ({dev['type']}), torch {report.versions['torch']}, transformers "
        f"{report.versions['transformers']}",
        f"workload: {wl['image_size'][0]}x{wl['image_size'][1]} image -> {tiles}, {wl['visual_tokens']} visual "
        f"tokens, {wl['prompt_tokens']} prompt tokens, batch {wl['batch_size']}, {wl['new_tokens']} new tokens; "
        f"{c['warmup']} warm-up + {c['repeats']} timed runs per row (medians; samples/s min-max)",
        f"preprocess (JPEG decode + tiling): {1e3 * report.preprocess_s_per_sample:.1f} ms/sample, not in samples/s; "
        f"dense matmul {dev['matmul_size']}^3: {dev['matmul_tflops']:.2f} TFLOP/s",
        "",
    ]
    cols = ["row", "samples/s", "(min-max)", "vs peer", "vs none", "TTFT ms", "ViT ms", "probe ms", "prefill ms",
            "decode ms", "vis tok", "TFLOP/smp", "prefill TF/s", "% mm", "peak GiB"]
    table = [cols]
    for r in report.rows:
        st = r.stages_s
        table.append([
            r.name, f"{r.samples_per_s.median:.2f}", f"{r.samples_per_s.min:.2f}-{r.samples_per_s.max:.2f}",
            _x(r.speedup_vs_peer), _x(r.speedup_vs_none), _ms(r.ttft_s), _ms(st.get("vit")), _ms(st.get("probe")),
            _ms(st.get("prefill")), _ms(st.get("decode")), f"{r.visual_tokens:.0f}",
            f"{r.flops_per_sample['total'] / 1e12:.3f}" if r.flops_per_sample else "-",
            f"{r.prefill_tflops.median:.2f}" if r.prefill_tflops else "-",
            f"{r.prefill_pct_of_matmul:.0f}" if r.prefill_pct_of_matmul is not None else "-",
            f"{r.peak_memory_bytes / GIB:.2f}" if r.peak_memory_bytes is not None else "-",
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [
        "  ".join(cell.ljust(wd) if i == 0 else cell.rjust(wd) for i, (cell, wd) in enumerate(zip(row, widths, strict=True)))
        for row in table
    ]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    tail = ["", "FLOPs: analytic, 2 per multiply-add; the peer row repeats ptp none's. TTFT: ViT + probe + prefill "
            "(peer: generate with max_new_tokens=1). Stage times are per batch."]
    if report.peer_tokens_match is not None:
        tail.append(f"peer shares ptp's weights; generated tokens identical to ptp none: {report.peer_tokens_match}")
    tail += ["", "issue targets (InternVL2-2B, bf16, 6 tiles + thumbnail, batch 32, 16 tokens, one H100):"]
    for ch in report.checks:
        value = "-" if ch.value is None else f"{ch.value:.2f}"
        tail.append(f"  {ch.status:<4}  {ch.name}: {value} (target {ch.target}){'; ' + ch.note if ch.note else ''}")
    return "\n".join(head + lines + tail)

