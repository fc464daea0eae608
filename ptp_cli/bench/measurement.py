"""Timing the rows: each row is a runner (ptp's engine with one method, or the transformers peer) that is
warmed up, then timed in rounds with the device synchronised around each clock reading.

Speedups come from pairs, not from medians of separate runs: in every round the baseline row (ptp ``none``)
runs between every two other rows, so each row is timed back to back with a baseline run before it and one
after it, and its speedup in that round is the baseline's rate around it over its own. The other rows' order
rotates and reverses from round to round. A machine whose speed drifts (clocks, other tenants) moves both
runs of a pair alike, so paired ratios stay put where single timings swing.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ptp_cli.run.devices import sync_device
from ptp_cli.run.engine import Engine, Request, Result

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
    peak_memory_bytes: int | None  # peak in the row (see peak_memory_kind)
    peak_memory_kind: str | None  # "cuda_allocated" (this row's weights included, not the other model's),
    # "cpu_rss" (resident set of the whole process, peak reset before the row) or "cpu_rss_process" (its peak
    # since the process started: where the reset is not available)
    visual_tokens: float  # mean visual tokens entering the LLM per sample
    visual_tokens_layer_mean: float  # mean visual tokens per LLM layer in prefill (in-LLM methods drop later)
    visual_tokens_last_layer: float  # mean visual tokens the last LLM layer processed (after every drop)
    flops_per_sample: dict[str, int]  # vit, probe, prefill, decode, total (peer: the analytic unpruned count)
    prefill_tflops: Stat | None  # achieved: prefill FLOPs of the batch / prefill time
    prefill_pct_of_matmul: float | None  # median prefill rate as % of the dense matmul rate
    speedup_vs_peer: float | None = None  # median over rounds of the paired ratio to the peer
    speedup_vs_none: float | None = None  # median over rounds of the paired ratio to ptp none
    paired_vs_peer: Stat | None = None  # that ratio's median, min and max over the rounds
    paired_vs_none: Stat | None = None
    flops_ratio_vs_none: float | None = None  # total FLOPs of none / this row's


class Runner(Protocol):
    name: str

    def warm(self) -> None: ...

    def measure(self) -> float: ...  # one timed batch; its wall seconds

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


_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux: write 5 to /proc/self/clear_refs); False where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    """The process's peak resident set in bytes (VmHWM; else getrusage's maximum since the start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    """Peak memory of one row over its runs. CUDA: allocated memory, counting the row's own weights but not
    another model held too. CPU: the resident set of the whole process (both models, Python, torch)."""

    def __init__(self, device: torch.device, own_weights: int) -> None:
        self.device = device
        self.own = own_weights
        self.peak: int | None = None
        self.kind: str | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync_device(self.device)
            self.other = torch.cuda.memory_allocated(self.device) - self.own
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_allocated"
        elif self.device.type == "cpu":
            self.kind = "cpu_rss" if _reset_peak_rss() and self.kind != "cpu_rss_process" else "cpu_rss_process"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync_device(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.other
        elif self.device.type == "cpu":
            peak = _peak_rss()
        else:
            return
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

    def measure(self) -> float:
        with self.memory:
            wall, self.results = timed(self.device, lambda: self.engine.generate(self.requests))
        self.walls.append(wall)
        self.timings.append(self.results[0].timing)
        return wall

    def row(self, *, matmul: float) -> BenchRow:
        b, results, timings = len(self.requests), self.results, self.timings
        rates = [sum(r.flops["prefill"] for r in results) / t["prefill"] / 1e12 for t in timings if t.get("prefill")]
        rate = Stat.of(rates) if rates else None
        method = self.engine.method
        per_layer = [visual_per_layer(r) for r in results]
        return BenchRow(
            name=self.name, engine=self.engine.kind, method=method.name, ratio=self.ratio, settings=method.settings(),
            samples_per_s=Stat.of([b / w for w in self.walls]), wall_s=Stat.of(self.walls),
            # vLLM rows: its own queue and prefill time of the batch's first request stand for prefill.
            ttft_s=Stat.of([t.get("vit", 0.0) + t.get("probe", 0.0)
                            + t.get("prefill", t.get("vllm_queue", 0.0) + t.get("vllm_prefill", 0.0)) for t in timings]),
            stages_s={k: Stat.of([t.get(k, t.get(f"vllm_{k}", 0.0)) for t in timings]) for k in STAGES},
            peak_memory_bytes=self.memory.peak, peak_memory_kind=self.memory.kind,
            visual_tokens=statistics.fmean(r.visual_after for r in results),
            visual_tokens_layer_mean=statistics.fmean(statistics.fmean(v) for v in per_layer),
            visual_tokens_last_layer=statistics.fmean(v[-1] for v in per_layer),
            flops_per_sample={k: round(statistics.fmean(r.flops[k] for r in results)) for k in results[0].flops},
            prefill_tflops=rate, prefill_pct_of_matmul=100 * rate.median / matmul if rate and matmul > 0 else None,
        )


def visual_per_layer(result: Result) -> list[int]:
    """Visual tokens each LLM layer processed in prefill: in-LLM methods drop only visual tokens, so a layer's
    length less the text tokens."""
    text = result.prompt_tokens - result.visual_after
    return [n - text for n in result.layer_lengths]


def round_order(n: int, *, base: int, k: int) -> list[int]:
    """Round ``k``'s runner order: the baseline first, last and between every two others; the others rotate by
    one per round and run in reverse in odd rounds, so each is paired with the baseline on both sides."""
    others = [i for i in range(n) if i != base]
    if others:
        shift = k % len(others)
        others = others[shift:] + others[:shift]
    if k % 2:
        others.reverse()
    order = [base]
    for i in others:
        order += [i, base]
    return order


def paired_ratios(rounds: Sequence[Sequence[tuple[str, float]]], *, base: str) -> dict[str, list[float]]:
    """Per row, one speedup over ``base`` per round: the baseline's rate around the row's run (the geometric
    mean of the baseline runs just before and just after it) over the row's rate. ``rounds``: the timed runs
    in order, ``(row name, wall seconds)``."""
    out: dict[str, list[float]] = {}
    for runs in rounds:
        for p, (name, wall) in enumerate(runs):
            if name == base:
                continue
            around = [runs[q][1] for q in (p - 1, p + 1) if 0 <= q < len(runs) and runs[q][0] == base]
            if around:
                base_wall = math.sqrt(around[0] * around[1]) if len(around) == 2 else around[0]
                out.setdefault(name, []).append(base_wall / wall)  # rates are batch / wall
    return out


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@torch.inference_mode()
def measure(runners: Sequence[Runner], *, warmup: int, repeats: int, base: int,
            say: Callable[[str], None]) -> list[list[tuple[str, float]]]:
    """Warm every runner up ``warmup`` times, then time ``repeats`` rounds in ``round_order``; return every
    timed run, round by round, as ``(name, wall seconds)``."""
    if warmup > 0:
        for runner in runners:
            say(f"warm-up {runner.name} ({warmup} untimed run{'s' if warmup != 1 else ''})")
            for _ in range(warmup):
                runner.warm()
    rounds = []
    for k in range(repeats):
        say(f"round {k + 1}/{repeats}")
        rounds.append([(runners[i].name, runners[i].measure()) for i in round_order(len(runners), base=base, k=k)])
    return rounds
