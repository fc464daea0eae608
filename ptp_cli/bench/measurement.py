"""Timing the rows: each row is a runner (ptp's engine with one method, or the transformers peer) that is
warmed up, then timed in rounds with the device synchronised around each clock reading.

Round k runs every row once, starting one row later than round k-1, so drift in the machine's speed
(clocks, other tenants) spreads over all rows alike.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ptp_cli.devices import sync_device
from ptp_cli.engine import Engine, Request, Result

STAGES = ("vit", "probe", "prefill", "decode")  # the engine's per-batch stages, in order


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
    flops_per_sample: dict[str, int]  # vit, probe, prefill, decode, total (peer: the analytic unpruned count)
    prefill_tflops: Stat | None  # achieved: prefill FLOPs of the batch / prefill time
    prefill_pct_of_matmul: float | None  # median prefill rate as % of the dense matmul rate
    speedup_vs_peer: float | None = None  # samples/s median over the peer's
    speedup_vs_none: float | None = None  # samples/s median over ptp none's
    flops_ratio_vs_none: float | None = None  # total FLOPs of none / this row's


class Runner(Protocol):
    name: str

    def warm(self) -> None: ...

    def measure(self) -> None: ...

    def row(self, *, matmul: float) -> BenchRow: ...


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


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied tensors counted once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class PeakMemory:
    """Peak device memory of one row over its runs, counting its own weights but not another model held too."""

    def __init__(self, device: torch.device, own_weights: int) -> None:
        self.device = device
        self.own = own_weights
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
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


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` with the device synchronised before and after, and its value."""
    sync_device(device)
    t0 = time.perf_counter()
    out = fn()
    sync_device(device)
    return time.perf_counter() - t0, out


class PtpRunner:
    """ptp's engine with one pruning method on the whole batch."""

    def __init__(self, name: str, engine: Engine, requests: list[Request], *, device: torch.device,
                 own_weights: int, ratio: float | None) -> None:
        self.name, self.engine, self.requests, self.device, self.ratio = name, engine, requests, device, ratio
        self.memory = PeakMemory(device, own_weights)
        self.walls: list[float] = []
        self.timings: list[dict[str, float]] = []
        self.results: list[Result] = []

    def warm(self) -> None:
        with self.memory:
            self.engine.generate(self.requests)

    def measure(self) -> None:
        with self.memory:
            wall, self.results = timed(self.device, lambda: self.engine.generate(self.requests))
        self.walls.append(wall)
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
            stages_s={k: Stat.of([t.get(k, 0.0) for t in timings]) for k in STAGES},
            peak_memory_bytes=self.memory.peak,
            visual_tokens=statistics.fmean(r.visual_after for r in results),
            flops_per_sample={k: round(statistics.fmean(r.flops[k] for r in results)) for k in results[0].flops},
            prefill_tflops=rate, prefill_pct_of_matmul=100 * rate.median / matmul if rate and matmul > 0 else None,
        )


@torch.inference_mode()
def measure(runners: Sequence[Runner], *, warmup: int, repeats: int, say: Callable[[str], None]) -> None:
    """Warm every runner up ``warmup`` times, then time ``repeats`` rounds of every runner."""
    if warmup > 0:
        for runner in runners:
            say(f"warm-up {runner.name} ({warmup} untimed run{'s' if warmup != 1 else ''})")
            for _ in range(warmup):
                runner.warm()
    for k in range(repeats):
        say(f"round {k + 1}/{repeats}")
        for i in range(len(runners)):
            runners[(i + k) % len(runners)].measure()
