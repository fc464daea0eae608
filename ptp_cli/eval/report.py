"""The eval report: runs side by side as a Markdown table (and per group), a JSON document, and a plot.

Retention is a run's score over the unpruned (``none``) run's score on the same records; with several
metrics, the mean of the per-metric ratios (the paper's "average retention"). The plot draws the mean
score of each run against the visual tokens it kept, one line per method and one panel per metric (metrics are
never averaged together on an axis), with Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import orjson
from PIL import Image, ImageDraw, ImageFont

from ptp_cli.eval.metrics import METRICS
from ptp_cli.eval.score import YESNO_EXTRAS, Item, RunScore, summarize

MISSING_GROUP = "(missing)"  # the group of records without the --by field
_LABELS = {"yesno_precision": "yesno P", "yesno_recall": "yesno R", "yesno_f1": "yesno F1",
           "yesno_yes_ratio": "yes ratio"}  # Markdown column names of POPE's extra numbers


def retention(scores: dict[str, float], base: dict[str, float]) -> float | None:
    """Mean over the metrics both have (and the baseline scores above 0) of score / baseline score."""
    ratios = [scores[m] / base[m] for m in METRICS if m in scores and base.get(m)]
    return fmean(ratios) if ratios else None


def group_key(value: Any) -> str:
    if value is None:
        return MISSING_GROUP
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _groups(items: Sequence[Item], by: str) -> dict[str, list[Item]]:
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(group_key(item.gold.fields.get(by)), []).append(item)
    return dict(sorted(groups.items()))


@dataclass
class Report:
    runs: list[RunScore]  # in the order they are shown; the first `none` run is the baseline
    by: str | None = None  # the gold field of the per-group breakdown
    title: str | None = None  # what was evaluated: model, n and the gold split (the plot's title, the JSON's)

    @property
    def baseline(self) -> RunScore | None:
        return next((r for r in self.runs if r.method == "none"), None)

    def to_dict(self) -> dict[str, Any]:
        base = self.baseline
        base_scores = base.scores() if base is not None else None
        base_groups = _groups(base.items, self.by) if base is not None and self.by else {}
        runs = []
        for run in self.runs:
            scores = run.scores()
            entry: dict[str, Any] = {
                "name": run.name, "method": run.method, "ratio": run.ratio, "n": run.n,
                "n_errors": run.n_errors, "n_missing": run.n_missing, "n_unmatched": run.n_unmatched,
                "scores": scores,
                "retention": retention(scores, base_scores) if base_scores is not None else None,
                "visual_tokens": run.visual_tokens, "visual_before": run.visual_before, "tflops": run.tflops,
                "samples_per_s": run.samples_per_s, "predictions": run.source, "groups": {},
            }
            if self.by:
                for key, items in _groups(run.items, self.by).items():
                    g_scores = summarize(items)
                    g_base = summarize(base_groups[key]) if key in base_groups else None
                    entry["groups"][key] = {
                        "n": len(items), "n_errors": sum(i.answer is None for i in items), "scores": g_scores,
                        "retention": retention(g_scores, g_base) if g_base is not None else None,
                    }
            runs.append(entry)
        return {"title": self.title, "by": self.by, "runs": runs}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


# ---------------------------------------------------------------------------------------------------------
# Markdown


def _score_columns(runs: Sequence[dict[str, Any]]) -> list[str]:
    present = {k for r in runs for k in r["scores"]}
    order = [c for m in METRICS for c in (m, *(f"yesno_{x}" for x in YESNO_EXTRAS if m == "yesno"))]
    return [c for c in order if c in present]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(report: Report) -> str:
    """One row per run; with ``by``, one more table per group. Scores and retention in percent."""
    data = report.to_dict()
    runs = data["runs"]
    cols = _score_columns(runs)
    labels = [_LABELS.get(c, c) for c in cols]
    header = ["run", "method", "ratio", "n", "errors", *labels, "retention", "visual tokens", "TFLOPs", "samples/s"]
    rows = []
    for r in runs:
        # whole tokens: a mean of 1889.6 kept is shown as 1890, as the count before pruning is
        tokens = _num(r["visual_tokens"], ".0f") + ("" if r["visual_before"] is None else f" / {r['visual_before']:.0f}")
        rows.append([
            r["name"], r["method"] or "-", _num(r["ratio"], "g"), str(r["n"]), str(r["n_errors"]),
            *(_num(100 * r["scores"][c] if c in r["scores"] else None, ".1f") for c in cols),
            _num(None if r["retention"] is None else 100 * r["retention"], ".1f"),
            tokens, _num(r["tflops"], ".3g"), _num(r["samples_per_s"], ".3g"),
        ])
    out = ([report.title] if report.title else []) + [_table(header, rows)]
    if report.by:
        keys = sorted({k for r in runs for k in r["groups"]})
        for key in keys:
            g_rows = []
            for r in runs:
                g = r["groups"].get(key)
                if g is None:
                    continue
                g_rows.append([
                    r["name"], str(g["n"]), str(g["n_errors"]),
                    *(_num(100 * g["scores"][c] if c in g["scores"] else None, ".1f") for c in cols),
                    _num(None if g["retention"] is None else 100 * g["retention"], ".1f"),
                ])
            out.append(f"{report.by} = {key}\n\n" + _table(["run", "n", "errors", *labels, "retention"], g_rows))
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Plot

_PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (23, 190, 207))
_SIZE = (880, 540)  # the plot's width and height in pixels
_BOX = (80, 30, 700, 470)  # the axes: left, top, right, bottom


def _ticks(lo: float, hi: float, *, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step) + 1)]


def _panel_points(report: Report, metric: str) -> dict[str, list[tuple[float, float]]]:
    """Per method (and variant), (visual tokens kept, score of ``metric``) of each run that has both."""
    points: dict[str, list[tuple[float, float]]] = {}
    for run in report.runs:
        y = run.scores().get(metric)
        if run.visual_tokens is None or y is None:
            continue
        variant = run.name.split(",", 1)[1] if "," in run.name else ""  # ptp@0.75,alpha=0: its own line
        points.setdefault(f"{run.method or run.name} {variant}".strip(), []).append((run.visual_tokens, y))
    return points


def draw_plot(report: Report, path: str | Path) -> None:
    """Score against visual tokens kept per sample, one line per method, as a PNG: one panel per metric in use
    (each y axis names its metric; metrics are never averaged together), titled with ``report.title``."""
    metrics = [m for m in METRICS if _panel_points(report, m)]
    if not metrics:
        raise ValueError("no run has an answered record to plot")
    head = 28 if report.title else 0
    img = Image.new("RGB", (_SIZE[0], head + _SIZE[1] * len(metrics)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    if report.title:
        draw.text((_SIZE[0] / 2, 16), report.title, fill="black", font=font, anchor="mm")
    for k, metric in enumerate(metrics):
        _draw_panel(draw, font, _panel_points(report, metric), top_offset=head + k * _SIZE[1],
                    label=f"{_LABELS.get(metric, metric)} (%)")
    img.save(path, format="PNG", optimize=True)


def _draw_panel(draw: ImageDraw.ImageDraw, font: Any, points: dict[str, list[tuple[float, float]]], *,
                top_offset: int, label: str) -> None:
    xs = [x for pts in points.values() for x, _ in pts]
    x_ticks = _ticks(min(xs) * 0.95, max(xs) * 1.02)
    y_ticks = _ticks(0.0, max(1e-9, max(y for pts in points.values() for _, y in pts)))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, top, right, bottom = _BOX
    top, bottom = top + top_offset, bottom + top_offset

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0 or 1) * (right - left), bottom - (y - y0) / (y1 - y0 or 1) * (bottom - top))

    for x in x_ticks:
        px = at(x, y0)[0]
        draw.line([(px, top), (px, bottom)], fill=(230, 230, 230))
        draw.text((px, bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    for y in y_ticks:
        py = at(x0, y)[1]
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.text((left - 6, py), f"{100 * y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text(((left + right) / 2, top_offset + _SIZE[1] - 16), "visual tokens kept per sample", fill="black",
              font=font, anchor="mm")
    draw.text((8, top - 22), label, fill="black", font=font)
    for i, (method, pts) in enumerate(sorted(points.items(), key=lambda kv: kv[0] != "none")):
        colour = _PALETTE[i % len(_PALETTE)]
        xy = [at(x, y) for x, y in sorted(pts)]
        if method == "none":  # the unpruned score, dashed across the plot as the reference
            for px in range(left, right, 12):
                draw.line([(px, xy[0][1]), (min(px + 6, right), xy[0][1])], fill=colour, width=2)
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3)
        for px, py in xy:
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        ly = top + 10 + 22 * i
        draw.line([(right + 20, ly), (right + 44, ly)], fill=colour, width=3)
        draw.ellipse([right + 28, ly - 4, right + 36, ly + 4], fill=colour)
        draw.text((right + 52, ly), method, fill="black", font=font, anchor="lm")
