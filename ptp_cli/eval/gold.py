"""Gold records: what each question's right answer is, and which metric scores it.

A gold file is JSONL, usually the very file given to ``ptp infer`` (its ``image`` and ``question`` are ignored
here), or that input as Parquet, a ``datasets`` folder or WebDataset shards (``ptp_cli.io.formats``: the same fields
as columns, or in each sample's ``.json``; ``line`` is then the row or sample number). Per record:

- ``answer`` (a string, or a number) or ``answers`` (a list of strings, or of ``{"answer": ...}`` objects as in
  VQAv2's annotations); ``answers`` wins when both are given.
- optional ``choices``: a list (options A, B, C, ... in order) or an object ``{"A": text, ...}``; the gold
  ``answer`` is then a letter, or the text of one option.
- optional ``metric``: one of ``METRICS``. Else the file's metric (``--metric``), else inferred: ``answers``
  -> vqa, ``choices`` -> mc, a yes/no answer -> yesno, otherwise exact.
- ``id`` (default: the line number) and every other field, kept for ``--by FIELD`` breakdowns.

A gold line that cannot be scored is a ``UsageError`` naming the line: a reference is never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ptp_cli.errors import UsageError
from ptp_cli.eval.metrics import METRICS, normalize_answer, option_letters

JsonScalar = str | int | float | bool
_GOLD_FIELDS = frozenset({"id", "answer", "answers", "choices", "metric"})


@dataclass(frozen=True)
class Gold:
    """One gold record."""

    line: int  # 1-based physical line in the gold file (what ptp infer writes as the row's "line")
    id: JsonScalar  # the record's id, or its line number
    answers: tuple[str, ...]  # the right answer(s); several for vqa (the human answers) or alternatives
    metric: str  # a name in METRICS
    options: dict[str, str] | None = None  # letter -> option text, for mc
    fields: dict[str, Any] = field(default_factory=dict)  # the record's other fields (for --by)


def infer_metric(obj: dict[str, Any]) -> str:
    """The metric a record without one gets."""
    if obj.get("answers") is not None:
        return "vqa"
    if obj.get("choices") is not None:
        return "mc"
    answer = obj.get("answer")
    if isinstance(answer, str) and normalize_answer(answer) in ("yes", "no"):
        return "yesno"
    return "exact"


def _text(value: Any) -> str | None:
    """A gold answer as text: strings as they are, numbers as JSON writes them; anything else is None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return orjson.dumps(value).decode()
    return None


def _answers(obj: dict[str, Any]) -> tuple[str, ...]:
    if obj.get("answers") is not None:
        raw = obj["answers"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("answers must be a non-empty list")
        items = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        texts = [_text(a) for a in items]
        if any(t is None for t in texts):
            raise ValueError("answers must hold strings (or {\"answer\": string} objects)")
        return tuple(t for t in texts if t is not None)
    if obj.get("answer") is None:
        raise ValueError("no gold answer (field 'answer' or 'answers')")
    text = _text(obj["answer"])
    if text is None:
        raise ValueError("answer must be a string or a number")
    return (text,)


def _options(obj: dict[str, Any]) -> dict[str, str] | None:
    raw = obj.get("choices")
    if raw is None:
        return None
    if isinstance(raw, list) and raw and all(_text(c) is not None for c in raw):
        return option_letters([_text(c) or "" for c in raw])
    if isinstance(raw, dict) and raw and all(isinstance(k, str) and len(k) == 1 and k.isupper() for k in raw):
        return {k: _text(v) or "" for k, v in raw.items()}
    raise ValueError("choices must be a list of option texts or an object {\"A\": text, ...}")


def _gold_letter(answers: tuple[str, ...], options: dict[str, str]) -> tuple[str, ...]:
    """The gold answer of an mc record as its option letter (it may be given as the option's text)."""
    answer = answers[0].strip().strip("().")
    if answer.upper() in options and len(answer) == 1:
        return (answer.upper(),)
    by_text = [k for k, v in options.items() if v.strip().lower() == answers[0].strip().lower()]
    if len(by_text) == 1:
        return (by_text[0],)
    raise ValueError(f"the gold answer {answers[0]!r} is neither an option letter ({', '.join(options)}) "
                     "nor the text of one option")


def parse_gold(obj: Any, *, line: int, metric: str | None = None) -> Gold:
    """One gold line's JSON value -> Gold; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    rid = obj.get("id")
    if rid is None:
        rid = line
    elif isinstance(rid, dict | list):
        raise ValueError("id must be a string or a number")
    name = obj.get("metric") or metric or infer_metric(obj)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    answers = _answers(obj)
    options = _options(obj)
    if name == "mc":
        if options is None:
            raise ValueError("metric mc needs 'choices'")
        answers = _gold_letter(answers, options)
    if name == "yesno" and normalize_answer(answers[0]) not in ("yes", "no"):
        raise ValueError(f"metric yesno needs a yes or no answer, not {answers[0]!r}")
    fields = {k: v for k, v in obj.items() if k not in _GOLD_FIELDS}
    return Gold(line=line, id=rid, answers=answers, metric=name, options=options, fields=fields)


def iter_jsonl(path: str | os.PathLike[str], *, what: str) -> Iterator[tuple[int, Any]]:
    """(1-based line, JSON value) of every non-blank line; ``what`` names the file in errors ("gold file")."""
    try:
        f = Path(path).open("rb")  # noqa: SIM115 (closed below; a failed open is a usage error, not a crash)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
            except orjson.JSONDecodeError as e:
                raise UsageError(f"{what} {path}, line {lineno}: not valid JSON ({e})") from None


def read_gold(path: str | os.PathLike[str], *, metric: str | None = None) -> list[Gold]:
    """Every gold record of a JSONL file. ``metric``: the file's metric for records that name none."""
    if metric is not None and metric not in METRICS:
        raise UsageError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    from ptp_cli.io.formats import iter_rows

    golds = []
    rows = iter_rows(str(path))  # Parquet, Arrow, WebDataset: their rows (the answer column); else JSONL
    for lineno, obj in rows if rows is not None else iter_jsonl(path, what="gold file"):
        try:
            golds.append(parse_gold(obj, line=lineno, metric=metric))
        except ValueError as e:
            raise UsageError(f"gold file {path}, line {lineno}: {e}") from None
    if not golds:
        raise UsageError(f"gold file {path} holds no records")
    return golds
