"""The benchmark's report: ``BenchReport`` (also its JSON form) and the text table ``ptp bench`` prints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from ptp_cli.bench.measurement import BenchRow, Stat
from ptp_cli.bench.targets import GIB, Check, with_unit

SCHEMA_VERSION = 2  # 2: paired speedups (paired_vs_*), rounds, load averages, visual tokens per layer, CPU RSS


@dataclass
class BenchReport:
    config: dict[str, Any]  # the BenchConfig, with dtype and device resolved
    device: dict[str, Any]  # type, name, dense matmul rate (the better of before and after the rows)
    versions: dict[str, str]  # torch, transformers, ptp, python
    model: dict[str, Any]  # name, source, parameter counts, shape summary
    workload: dict[str, Any]  # image size, tiles, tokens per sample
    preprocess_s_per_sample: float  # decode + tile one synthetic JPEG (median of a few)
    rows: list[BenchRow]
    checks: list[Check]  # the performance targets (ptp_cli.bench.targets), with this run's values
    peer_tokens_match: bool | None  # peer and ptp none generated the same tokens (only with shared weights)
    # --engine vllm: vLLM's own InternVL2 ("row", "measured": False, "reason") and the vLLM rows over the row
    # standing in for it ("stand_in", "paired_vs_stand_in": name -> Stat); None otherwise
    vllm_peer: dict[str, Any] | None = None
    rounds: list[list[list[Any]]] = field(default_factory=list)  # every timed run in order: [row name, wall s]
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def row(self, name: str) -> BenchRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


# ---------------------------------------------------------------------------------------------------------
# Numbers as text


def sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures, never in exponent form and never rounded to zero:
    0.000123 -> '0.000123', 12.345 -> '12.3', 1234.5 -> '1234'."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def si(value: float, unit: str = "") -> str:
    """3.1e12 -> '3.10 T' + unit (k, M, G, T, P), three significant figures."""
    for power, prefix in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(value) >= 10**power:
            return f"{sig(value / 10**power)} {prefix}{unit}"
    return f"{sig(value)} {unit}".rstrip()


def _ms(s: Stat | None) -> str:
    return "-" if s is None else sig(1e3 * s.median)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{sig(v)}x"


def _paired(s: Stat | None) -> str:
    """'1.52x (1.41-1.60)': the median paired ratio and its range over the rounds ('1.00x' for the baseline)."""
    if s is None:
        return "-"
    if s.n < 2 or s.min == s.max:
        return _x(s.median)
    return f"{_x(s.median)} ({sig(s.min)}-{sig(s.max)})"


def noisy(s: Stat | None) -> bool:
    """A paired ratio whose range over the rounds is wider than the effect it reports (its distance from 1x)."""
    return s is not None and s.n >= 2 and s.max - s.min > abs(s.median - 1.0)


def noise_warnings(report: BenchReport) -> list[str]:
    """Plain warning lines for speedups a reader should not quote: within noise, or from a single round."""
    if report.config["repeats"] < 2:
        return ["warning: speedups below come from one timed round, so their noise is unknown; use --repeats N "
                "(5 or more)"]
    rows = [r.name for r in report.rows if noisy(r.paired_vs_none) or noisy(r.paired_vs_peer)]
    if not rows:
        return []
    return [f"warning: speedups below are within noise ({', '.join(rows)}: the range over the rounds is wider "
            "than the effect): the machine is busy or the run too short; use --repeats N"]


MEMORY_KINDS = {"cuda_allocated": "CUDA peak", "cpu_rss": "CPU peak RSS", "cpu_rss_process": "CPU peak RSS"}


def _or_dash(v: float | None, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(sig(v))


# ---------------------------------------------------------------------------------------------------------
# The table

# Two header lines per column: a plain name, then its unit or qualifier.
COLUMNS = (
    ("row", ""), ("samples/s", "median"), ("samples/s", "min-max"), ("speedup vs", "transformers"),
    ("speedup vs", "none"), ("first token", "ms"), ("ViT", "ms"), ("probe", "ms"), ("prefill", "ms"),
    ("decode", "ms"), ("visual tokens", "layer mean"), ("visual tokens", "last layer"),
    ("FLOPs", "per sample"), ("prefill", "FLOP/s"), ("prefill, % of", "matmul rate"), ("peak memory", "GiB"),
)


def _cells(r: BenchRow) -> list[str]:
    st, flops = r.stages_s, r.flops_per_sample
    return [
        r.name, sig(r.samples_per_s.median), f"{sig(r.samples_per_s.min)}-{sig(r.samples_per_s.max)}",
        _paired(r.paired_vs_peer), _paired(r.paired_vs_none), _ms(r.ttft_s), _ms(st.get("vit")),
        _ms(st.get("probe")), _ms(st.get("prefill")), _ms(st.get("decode")), f"{r.visual_tokens_layer_mean:.0f}",
        f"{r.visual_tokens_last_layer:.0f}",
        si(flops["total"]) if flops else "-",
        si(1e12 * r.prefill_tflops.median) if r.prefill_tflops else "-",
        _or_dash(r.prefill_pct_of_matmul), _or_dash(None if r.peak_memory_bytes is None else r.peak_memory_bytes / GIB),
    ]


def _table(rows: list[list[str]], *, header_lines: int) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(header_lines, "  ".join("-" * w for w in widths))
    return [line.rstrip() for line in lines]


def plural(n: int, word: str) -> str:
    """1 -> '1 tile', 7 -> '7 tiles'."""
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith(('s', 'ch')) else 's'}"


def params_text(n: int) -> str:
    """2.2e9 -> '2.21 billion parameters'."""
    for power, word in ((9, "billion"), (6, "million"), (3, "thousand")):
        if n >= 10**power:
            return f"{sig(n / 10**power)} {word} parameters"
    return plural(n, "parameter")



def _targets(checks: list[Check]) -> list[str]:
    words = {"PASS": "met", "FAIL": "missed", "n.a.": "not applicable"}
    lines = ["Performance targets (each is defined for one setup; in any other run it is 'not applicable'):"]
    setups: list[str] = []
    for ch in checks:
        value = "not measured" if ch.value is None else with_unit(sig(ch.value), ch.unit)
        lines.append(f"  {words[ch.status]:<14}  {ch.name}: {value} (target {ch.target})")
        if ch.value is not None and ch.note and ch.note not in setups:
            setups.append(ch.note)
    return lines + [f"  {note}" for note in setups]


def _vllm_peer(peer: dict[str, Any]) -> list[str]:
    """The lines on vLLM's own InternVL2: why it is no row, and the vLLM rows over its stand-in."""
    over = "; ".join(f"{name} {_paired(s)}" for name, s in peer["paired_vs_stand_in"].items())
    lines = [f"vLLM's own multimodal InternVL2, unpruned, is not a row: {peer['reason']}.",
             f"{peer['stand_in']} (vLLM generating from ptp's unpruned embeddings) stands in for it."]
    if over:
        lines.append(f"ptp+vLLM over {peer['stand_in']}, paired through the same none runs: {over}")
    return lines


def format_report(report: BenchReport, *, targets: bool = False) -> str:
    """A readable table of the rows, the run's context, and (``targets``) the performance targets."""
    wl, dev, c = report.workload, report.device, report.config
    tiles = plural(wl["tiles"], "tile") + (f" ({wl['grid_tiles']} + thumbnail)" if wl["thumbnail"] else "")
    runs = plural(c["repeats"], "timed run") + " per row (medians)"
    if c["warmup"]:
        runs = f"{c['warmup']} warm-up + {runs}"
    load = ""
    if dev.get("load_average_before") and dev.get("load_average_after"):
        load = (f"; machine load (1-min average) {dev['load_average_before'][0]:.2f} before the rows, "
                f"{dev['load_average_after'][0]:.2f} after, on {plural(dev['cpus'] or 0, 'CPU')}")
    head = [
        f"ptp bench: {report.model['name']} ({params_text(report.model['params'])}, {c['dtype']}) on "
        f"{dev['name']} ({dev['type']}), torch {report.versions['torch']}, transformers "
        f"{report.versions['transformers']}",
        f"workload: {wl['image_size'][0]}x{wl['image_size'][1]} image -> {tiles}, {wl['visual_tokens']} visual "
        f"tokens, {wl['prompt_tokens']} prompt tokens, batch {wl['batch_size']}, {wl['new_tokens']} new tokens; "
        f"{runs}",
        f"preprocessing (JPEG decode + tiling): {sig(1e3 * report.preprocess_s_per_sample)} ms per sample, not "
        f"included in samples/s; dense matmul {dev['matmul_size']}^3: {si(1e12 * dev['matmul_tflops'], 'FLOP/s')}"
        f"{load}",
        "",
        *noise_warnings(report),
    ]
    kinds = {r.peak_memory_kind for r in report.rows if r.peak_memory_kind}
    memory = ", ".join(sorted({MEMORY_KINDS[k] for k in kinds}))
    header = [[top for top, _ in COLUMNS], [f"GiB, {memory}" if top == "peak memory" and memory else bottom
                                            for top, bottom in COLUMNS]]
    table = _table([*header, *(_cells(r) for r in report.rows)], header_lines=len(header))
    tail = ["", "Speedups: paired, median (min-max) over the rounds: in each round, the row's rate over that of "
            "the none runs timed just before and after it (vs transformers: through the same none runs).",
            "Visual tokens: what the LLM processed per sample in prefill, averaged over its layers, and at its last "
            "layer (fastv, pdrop and vtw drop tokens inside the LLM).",
            "FLOPs: analytic, 2 per multiply-add (transformers' row: the unpruned count). First token: ViT + "
            "probe + prefill (transformers: generate with max_new_tokens=1). Stage times are per batch."]
    if "cpu_rss" in kinds or "cpu_rss_process" in kinds:
        since = " (since the process started)" if "cpu_rss_process" in kinds else ""
        tail.append(f"Peak memory: the resident set of the whole process{since}, both models included.")
    if report.peer_tokens_match is not None:
        tail.append(f"transformers uses ptp's weights here; its tokens equal ptp none's: "
                    f"{'yes' if report.peer_tokens_match else 'NO'}")
    if report.vllm_peer is not None:
        tail += _vllm_peer(report.vllm_peer)
    if targets:
        tail += ["", *_targets(report.checks)]
    return "\n".join(head + table + tail)
