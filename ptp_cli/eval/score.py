"""Scoring one run: predictions matched to gold records, one score per record, summaries per metric.

Matching: a prediction row belongs to the gold record on its ``line`` when their ids agree (the usual case:
the gold file is the file ``ptp infer`` read); otherwise to the gold record with its ``id``, when that id is
unique on both sides (a predictions file written from another ordering of the same records).

A gold record without a prediction, or whose prediction is an error row, scores 0 and is counted
(``n_errors``); nothing is skipped.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Protocol

import orjson

from ptp_cli.errors import UsageError
from ptp_cli.eval import metrics as M
from ptp_cli.eval.gold import Gold, iter_jsonl

YESNO_EXTRAS = ("precision", "recall", "f1", "yes_ratio")  # reported as yesno_<name> next to yesno (accuracy)


def score_answer(gold: Gold, answer: str) -> float:
    """One answer's score under the gold record's metric, in [0, 1]."""
    name = gold.metric
    if name == "exact":
        return M.exact_match(answer, gold.answers)
    if name == "vqa":
        return M.vqa_accuracy(answer, gold.answers)
    if name == "anls":
        return M.anls(answer, gold.answers)
    if name == "relaxed":
        return M.relaxed_accuracy(answer, gold.answers)
    if name == "mc":
        return M.mc_accuracy(answer, gold.answers[0], gold.options or {})
    if name == "yesno":
        return M.yesno_accuracy(answer, gold.answers[0])
    raise ValueError(f"unknown metric {name!r}")


@dataclass(frozen=True)
class Item:
    """One gold record's outcome in one run."""

    gold: Gold
    answer: str | None  # the predicted answer; None when the prediction is missing or an error row
    score: float  # in [0, 1]; 0 without an answer
    missing: bool  # no prediction row at all (an error row is not missing)


def summarize(items: Sequence[Item]) -> dict[str, float]:
    """Mean score per metric over the items (yesno adds POPE's precision, recall, F1 and yes-ratio)."""
    by_metric: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_metric[item.gold.metric].append(item)
    scores: dict[str, float] = {}
    for name in M.METRICS:
        group = by_metric.get(name)
        if not group:
            continue
        scores[name] = fmean(i.score for i in group)
        if name == "yesno":
            pope = M.yesno_summary((i.answer, i.gold.answers[0]) for i in group)
            scores.update({f"yesno_{k}": getattr(pope, k) for k in YESNO_EXTRAS})
    return scores


@dataclass
class RunScore:
    """Every gold record scored against one predictions file."""

    name: str  # "ptp@0.5", "none", or the predictions file's name
    method: str | None  # from the rows' settings
    ratio: float | None  # from the rows' settings (None for methods that ignore it)
    items: list[Item]  # one per gold record, in gold order
    n_unmatched: int = 0  # prediction rows that belong to no gold record
    visual_tokens: float | None = None  # mean visual tokens the LLM saw per answered sample
    visual_before: float | None = None  # mean visual tokens before pruning per answered sample
    tflops: float | None = None  # mean TFLOPs per answered sample
    samples_per_s: float | None = None  # engine throughput: answered samples / summed per-sample batch time
    source: str | None = None  # the predictions file
    model: str | None = None  # from the rows' settings

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def n_errors(self) -> int:
        return sum(i.answer is None for i in self.items)

    @property
    def n_missing(self) -> int:
        return sum(i.missing for i in self.items)

    def scores(self) -> dict[str, float]:
        return summarize(self.items)


def _key(value: Any) -> bytes:
    """Ids compare as their JSON text: 1 and "1" are different ids."""
    return orjson.dumps(value)


class Keyed(Protocol):
    """A gold or input record: its line in its file and its id."""

    line: int
    id: Any


def match_rows(golds: Sequence[Keyed], rows: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping | None], int]:
    """The prediction row of each gold (or input) record (None: none), and how many rows matched no record.

    Several rows for one line (a file appended to by hand) resolve to the last one.
    """
    by_line: dict[Any, Mapping] = {}
    loose: list[Mapping] = []  # rows without an integer line
    for row in rows:
        line = row.get("line")
        if isinstance(line, int) and not isinstance(line, bool):
            by_line[line] = row
        else:
            loose.append(row)
    candidates = [*by_line.values(), *loose]
    by_id: dict[bytes, list[Mapping]] = defaultdict(list)
    for row in candidates:
        by_id[_key(row.get("id"))].append(row)
    gold_ids = Counter(_key(g.id) for g in golds)
    matched: list[Mapping | None] = []
    used: set[int] = set()
    for g in golds:
        row = by_line.get(g.line)
        if row is None or _key(row.get("id")) != _key(g.id):
            same_id = by_id.get(_key(g.id), [])
            row = same_id[0] if len(same_id) == 1 and gold_ids[_key(g.id)] == 1 else None
        if row is not None and id(row) in used:
            row = None
        if row is not None:
            used.add(id(row))
        matched.append(row)
    return matched, len(candidates) - len(used)


def _answer(row: Mapping[str, Any] | None) -> str | None:
    if row is None or row.get("error") is not None:
        return None
    answer = row.get("answer")
    return answer if isinstance(answer, str) else None


def _mean(values: list[float]) -> float | None:
    return fmean(values) if values else None


def _run_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Tokens, FLOPs and throughput of the answered rows."""
    after, before, flops, seconds = [], [], [], 0.0
    for row in rows:
        tokens, fl, timing = row.get("tokens") or {}, row.get("flops") or {}, row.get("timing") or {}
        if isinstance(tokens.get("visual_after"), int | float):
            after.append(float(tokens["visual_after"]))
        if isinstance(tokens.get("visual_before"), int | float):
            before.append(float(tokens["visual_before"]))
        if isinstance(fl.get("total"), int | float):
            flops.append(fl["total"] / 1e12)
        # Stage times are those of the batch the row ran in; its share is the time over the batch size.
        batch = timing.get("batch") or 1
        seconds += sum(float(timing.get(k) or 0.0) for k in ("vit", "probe", "prefill", "decode")) / batch
    return {
        "visual_tokens": _mean(after), "visual_before": _mean(before), "tflops": _mean(flops),
        "samples_per_s": len(rows) / seconds if rows and seconds > 0 else None,
    }


def score_run(
    golds: Sequence[Gold], rows: Iterable[Mapping[str, Any]], *, name: str, source: str | None = None
) -> RunScore:
    """Score the prediction rows of one run against the gold records."""
    matched, unmatched = match_rows(golds, rows)
    items = []
    for g, row in zip(golds, matched, strict=True):
        answer = _answer(row)
        items.append(Item(g, answer, score_answer(g, answer) if answer is not None else 0.0, row is None))
    answered = [r for r in matched if _answer(r) is not None]
    settings = next((r.get("settings") for r in answered if isinstance(r.get("settings"), dict)), None) or {}
    ratio = settings.get("ratio")
    return RunScore(
        name=name, method=settings.get("method"), ratio=float(ratio) if isinstance(ratio, int | float) else None,
        items=items, n_unmatched=unmatched, source=source, model=settings.get("model"), **_run_stats(answered),
    )


def read_predictions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``ptp infer`` output file. Rows that are not JSON objects are a UsageError."""
    from ptp_cli.io.formats import read_rows

    if (converted := read_rows(path)) is not None:  # a Parquet output, or OpenAI batch output lines
        return list(converted)
    rows = []
    for lineno, obj in iter_jsonl(path, what="predictions file"):
        if not isinstance(obj, dict):
            raise UsageError(f"predictions file {path}, line {lineno}: not a JSON object")
        rows.append(obj)
    return rows
