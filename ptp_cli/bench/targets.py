"""The project's performance targets, as data: a table of named thresholds and the setup each applies to.

A target is checked against a finished report's rows. Outside its setup the value is still shown, marked
not applicable. ``ptp bench --targets`` prints them; the JSON report always carries them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptp_cli.bench.measurement import BenchRow

GIB = 1 << 30


@dataclass(frozen=True)
class Setup:
    """The run a target is defined for."""

    description: str  # in words, for the report
    source: str = "internvl2-2b"  # --shape
    dtype: str = "bfloat16"
    device_type: str = "cuda"
    tiles: tuple[int, int | None] = (7, 7)  # fewest, most tiles per image (None: no upper bound)
    batch_size: tuple[int, int | None] = (32, 32)  # smallest, largest batch
    new_tokens: int | None = 16  # None: any

    def matches(self, run: dict[str, Any]) -> bool:
        """``run``: source, dtype, device_type, tiles, batch_size, new_tokens of the measured run."""
        def within(value: int, bounds: tuple[int, int | None]) -> bool:
            return value >= bounds[0] and (bounds[1] is None or value <= bounds[1])

        return (run["source"] == self.source and run["dtype"] == self.dtype and run["device_type"] == self.device_type
                and within(run["tiles"], self.tiles) and within(run["batch_size"], self.batch_size)
                and (self.new_tokens is None or run["new_tokens"] == self.new_tokens))


@dataclass(frozen=True)
class Target:
    name: str  # what is compared, in plain words
    metric: str  # a key of METRICS
    row: str | None  # the row it reads (None: every ptp row)
    op: str  # ">=" | "<="
    threshold: float
    unit: str  # "x", "%", "GiB"
    setup: Setup


@dataclass(frozen=True)
class Check:
    name: str  # the target's name
    value: float | None  # what this run measured
    target: str  # the threshold, in words
    status: str  # "PASS" | "FAIL" | "n.a."
    note: str = ""  # why n.a.
    unit: str = ""  # of value: "x", "%", "GiB"


def with_unit(number: str, unit: str) -> str:
    """'1.5' + 'x' -> '1.5x', '40' + 'GiB' -> '40 GiB'."""
    return f"{number}{' ' if unit[:1].isalpha() and unit != 'x' else ''}{unit}"


def _speedup_vs_peer(rows: dict[str, BenchRow], row: str | None) -> float | None:
    return rows[row].speedup_vs_peer if row in rows else None


def _speedup_per_flops(rows: dict[str, BenchRow], row: str | None) -> float | None:
    r = rows.get(row) if row else None
    if r is None or not r.speedup_vs_none or not r.flops_ratio_vs_none:
        return None
    return r.speedup_vs_none / r.flops_ratio_vs_none


def _prefill_pct(rows: dict[str, BenchRow], row: str | None) -> float | None:
    return rows[row].prefill_pct_of_matmul if row in rows else None


def _probe_pct(rows: dict[str, BenchRow], row: str | None) -> float | None:
    r = rows.get(row) if row else None
    return 100 * r.stages_s["probe"].median / r.wall_s.median if r is not None and "probe" in r.stages_s else None


def _peak_gib(rows: dict[str, BenchRow], row: str | None) -> float | None:
    peaks = [r.peak_memory_bytes for r in rows.values()
             if r.engine == "ptp" and r.peak_memory_bytes is not None and r.peak_memory_kind == "cuda_allocated"]
    return max(peaks) / GIB if peaks else None


METRICS: dict[str, Callable[[dict[str, BenchRow], str | None], float | None]] = {
    "speedup_vs_transformers": _speedup_vs_peer,
    "speedup_over_flops_ratio": _speedup_per_flops,
    "prefill_pct_of_matmul": _prefill_pct,
    "probe_pct_of_batch_time": _probe_pct,
    "peak_memory_gib": _peak_gib,
}

MAIN = Setup("InternVL2-2B shape, bfloat16, one CUDA GPU, 6 tiles + thumbnail, batch 32, 16 new tokens")
LARGE = Setup("InternVL2-2B shape, bfloat16, one CUDA GPU, 12 tiles + thumbnail, batch 64 or more",
              tiles=(13, None), batch_size=(64, None), new_tokens=None)

TARGETS: tuple[Target, ...] = (
    Target("ptp without pruning: throughput over transformers", "speedup_vs_transformers", "none", ">=", 1.5, "x",
           MAIN),
    Target("ptp at ratio 0.5: throughput over transformers", "speedup_vs_transformers", "ptp@0.5", ">=", 2.5, "x",
           MAIN),
    Target("ptp at ratio 0.5: speedup over no pruning / FLOPs saved", "speedup_over_flops_ratio", "ptp@0.5", ">=",
           0.9, "", MAIN),
    Target("ptp without pruning: prefill rate, % of the dense matmul rate", "prefill_pct_of_matmul", "none", ">=",
           50, "%", MAIN),
    Target("ptp at ratio 0.5: scoring (probe + selection), % of batch time", "probe_pct_of_batch_time", "ptp@0.5",
           "<=", 10, "%", MAIN),
    Target("peak memory of every ptp row", "peak_memory_gib", None, "<=", 40, "GiB", LARGE),
)


def evaluate(rows: list[BenchRow], run: dict[str, Any], targets: tuple[Target, ...] = TARGETS) -> list[Check]:
    """One ``Check`` per target: its value in this run, and PASS/FAIL where the run is the target's setup."""
    by_name = {r.name: r for r in rows}
    out = []
    for t in targets:
        value = METRICS[t.metric](by_name, t.row)
        words = f"{t.op} {with_unit(f'{t.threshold:g}', t.unit)}"
        if value is None:
            out.append(Check(t.name, None, words, "n.a.", "not measured in this run", t.unit))
        elif not t.setup.matches(run):
            out.append(Check(t.name, value, words, "n.a.", f"applies to: {t.setup.description}", t.unit))
        else:
            ok = value >= t.threshold if t.op == ">=" else value <= t.threshold
            out.append(Check(t.name, value, words, "PASS" if ok else "FAIL", unit=t.unit))
    return out
