"""Input and output of ``ptp infer``: JSONL records in, JSONL result rows out, in input order, resumable.

Reading (``iter_records``) streams a JSONL file or stdin line by line and yields a ``Record`` for every usable
line and a ``BadRecord`` for every other non-blank line, so that a batch job fails per record, never per run.
Line numbers are 1-based over physical lines (``\\n``-separated; a trailing ``\\r`` is dropped). Blank lines
(nothing but whitespace) yield nothing and get no output row, but keep their number.

Input record fields:

- ``id``: any JSON scalar (string, number, boolean), echoed as is. ``null`` or absent: the line number.
- ``image``: a path; ``~`` is expanded; a relative path resolves against the JSONL file's folder (for stdin,
  the current directory), or against ``base_dir`` when given. URLs are refused.
- ``question`` (or ``prompt``; not both): a string that is not empty after stripping; stored stripped.
- optional overrides of the run's options: ``max_tiles``, ``min_tiles`` (int in 1..``config.MAX_TILES``),
  ``max_new_tokens`` (int >= 1), ``temperature`` (number >= 0), ``seed`` (int in 0..2**64-1). ``null`` means
  "use the run's value".
- any other field is echoed into the record's row (result or error) under the same name; a field whose name
  the output reserves (``OUTPUT_FIELDS``: ``answer``, ``tokens``, ...) is kept under ``"input"`` instead, so
  ``row["input"]["answer"]`` holds a VQA file's gold answer. No input field is lost.

Writing (``ptp_cli.io.output.OrderedWriter``) takes rows that finish out of order and writes them in input
order through a bounded reorder buffer, one orjson line per row, flushed after every burst.

Resuming (``scan_output``, in ``resume.py``) reads what an earlier run wrote.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ptp_cli.config import MAX_TILES
from ptp_cli.errors import ImageError, InvalidRecordError, RecordError, UsageError

JsonScalar = str | int | float | bool

# Top-level names of an output row; an input's extra field with one of these names goes under "input".
OUTPUT_FIELDS: frozenset[str] = frozenset(
    {
        "id",
        "input",
        "line",
        "answer",
        "finish_reason",
        "kept",
        "vit_kept",
        "record",
        "error",
        "tokens",
        "timing",
        "flops",
        "logprob",
        "logprobs",
        "method",
        "pruning",
        "settings",
    }
)
# Fields the reader interprets itself (never echoed as extras).
INPUT_FIELDS: frozenset[str] = frozenset(
    {"id", "image", "question", "prompt", "max_tiles", "min_tiles", "max_new_tokens", "temperature", "seed"}
)
_SEED_LIMIT = 2**64  # torch.manual_seed takes seeds below 2**64

_BOM = b"\xef\xbb\xbf"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:", re.ASCII)
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*", re.ASCII)


@dataclass(frozen=True, slots=True)
class Record:
    """One usable input line."""

    line: int  # 1-based physical line number in the input
    id: JsonScalar  # the record's id, or its line number when it had none
    image: Path | bytes  # absolute path (``~`` expanded, relative resolved; existence unchecked), or file bytes
    question: str  # stripped, never empty
    overrides: dict[str, int | float] = field(default_factory=dict)  # per-record option overrides, validated
    extra: dict[str, Any] = field(default_factory=dict)  # the fields ptp does not read, echoed in the row
    image_relative: bool = False  # the record gave a relative path (resolved against the image root)


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A non-blank input line that is not a usable record; it becomes an error row."""

    line: int  # 1-based physical line number in the input
    id: JsonScalar  # the line's id when its JSON parsed and had a valid one, else the line number
    error: RecordError  # what is wrong, for the row's ``error`` object


# ---------------------------------------------------------------------------------------------------------
# Reading


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (0-based I, 0 <= I < N) into ``(I, N)``; raise ``UsageError`` otherwise."""
    m = _SHARD.fullmatch(text)
    if m is None:
        raise UsageError(f"--shard must look like I/N with 0 <= I < N (e.g. 0/4), not {text!r}")
    i, n = int(m[1]), int(m[2])
    if n < 1:
        raise UsageError(f"--shard {text}: the shard count N must be at least 1")
    if i >= n:
        raise UsageError(f"--shard {text}: the shard index is 0-based, so I must be in 0..{n - 1}")
    return i, n


def iter_records(
    source: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    skip_lines: set[int] | frozenset[int] | None = None,
) -> Iterator[Record | BadRecord]:
    """Stream the records of a JSONL file, or of stdin when ``source`` is ``"-"``.

    ``shard=(i, n)`` keeps the non-blank lines whose 0-based index among non-blank lines is ``i`` modulo ``n``
    (bad lines count, so the n shards together cover every line once, and a shard's lines do not depend on
    ``skip_lines``). ``skip_lines`` (from ``scan_output``) drops lines already done. A missing or unreadable
    input file raises ``UsageError`` here, at the call, not at the first ``next``; a bad ``shard`` tuple
    raises ``ValueError`` (the CLI validates user input with ``parse_shard``).
    """
    lines = iter_lines(source, shard=shard, skip_lines=skip_lines)
    root = Path(base_dir).expanduser().absolute() if base_dir is not None else default_root(source)
    return (parse_line(raw, line=lineno, root=root) for lineno, raw in lines)


def default_root(source: str | os.PathLike[str]) -> Path:
    """Where relative image paths of ``source`` resolve: the JSONL file's folder, or the working directory."""
    if isinstance(source, str) and source == "-":
        return Path.cwd()
    return Path(source).absolute().parent


def iter_lines(
    source: str | os.PathLike[str],
    *,
    shard: tuple[int, int] | None = None,
    skip_lines: set[int] | frozenset[int] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of the non-blank lines ``iter_records`` would parse (same shard and skip
    rules), for callers that parse elsewhere (a Ray actor, say). Opens the file at the call."""
    if shard is not None and not (isinstance(shard, tuple) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be a tuple (i, n) with 0 <= i < n, not {shard!r}")
    if isinstance(source, str) and source == "-":
        stream: BinaryIO = sys.stdin.buffer
        owned = False
    else:
        path = Path(source)
        try:
            stream = path.open("rb")
        except OSError as e:
            raise UsageError(f"cannot read input {path}: {e.strerror or e}") from e
        owned = True
    return _iter_lines(stream, owned=owned, shard=shard, skip=skip_lines or frozenset())


def _iter_lines(
    stream: BinaryIO,
    *,
    owned: bool,
    shard: tuple[int, int] | None,
    skip: set[int] | frozenset[int],
) -> Iterator[tuple[int, bytes]]:
    try:
        index = -1  # among non-blank lines
        for lineno, raw in enumerate(stream, start=1):
            if lineno == 1 and raw.startswith(_BOM):  # Windows editors write one; orjson refuses it
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            index += 1
            if shard is not None and index % shard[1] != shard[0]:
                continue
            if lineno in skip:
                continue
            yield lineno, raw
    finally:
        if owned:
            stream.close()


def parse_line(raw: bytes, *, line: int, root: Path) -> Record | BadRecord:
    """Turn one non-blank input line into a ``Record``, or a ``BadRecord`` saying everything wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(
            line, line, InvalidRecordError(f"line is not valid UTF-8 (bad byte at offset {e.start})")
        )
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        return BadRecord(line, line, InvalidRecordError(f"line is not valid JSON: {e}"))
    if not isinstance(obj, dict):
        return BadRecord(line, line, InvalidRecordError(f"line is a JSON {_json_type(obj)}, not an object"))

    problems: list[str] = []
    rid = obj.get("id")
    if rid is None:
        rid = line
    elif isinstance(rid, dict | list):
        problems.append(f"id must be a string or a number, not a JSON {_json_type(rid)}")
        rid = line

    question = _question(obj, problems)
    image = _image(obj, root, problems)
    relative = isinstance(obj.get("image"), str) and not Path(obj["image"]).expanduser().is_absolute()
    overrides = _overrides(obj, problems)
    if problems:
        return BadRecord(line, rid, InvalidRecordError("; ".join(problems)))
    assert image is not None and question is not None
    extra = {k: v for k, v in obj.items() if k not in INPUT_FIELDS}
    return Record(line=line, id=rid, image=image, question=question, overrides=overrides, extra=extra,
                  image_relative=relative)


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _question(obj: dict[str, Any], problems: list[str]) -> str | None:
    has_q, has_p = obj.get("question") is not None, obj.get("prompt") is not None
    if has_q and has_p:
        problems.append("give question or prompt, not both")
        return None
    if not (has_q or has_p):
        problems.append("question is missing (field 'question' or 'prompt')")
        return None
    name = "question" if has_q else "prompt"
    value = obj[name]
    if not isinstance(value, str):
        problems.append(f"{name} must be a string, not a JSON {_json_type(value)}")
        return None
    if not value.strip():
        problems.append(f"{name} is empty")
        return None
    return value.strip()


def _image(obj: dict[str, Any], root: Path, problems: list[str]) -> Path | None:
    value = obj.get("image")
    if value is None:
        problems.append("image is missing")
        return None
    if not isinstance(value, str):
        problems.append(f"image must be a path string, not a JSON {_json_type(value)}")
        return None
    if not value.strip():
        problems.append("image is empty")
        return None
    if "\0" in value:
        problems.append("image path contains a NUL character")
        return None
    if _URL.match(value):
        problems.append("image must be a local path; URLs are not supported (download the images first)")
        return None
    # Path() joins with an absolute right side by taking it whole, so this handles both cases.
    return root / Path(value).expanduser()


def _int_in(value: object, lo: int, hi: int | None) -> bool:
    # bool is an int subclass in Python, but `"max_tiles": true` is a mistake, not 1.
    return (
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    )


def _overrides(obj: dict[str, Any], problems: list[str]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for name in ("max_tiles", "min_tiles"):
        if (v := obj.get(name)) is not None:
            if _int_in(v, 1, MAX_TILES):
                out[name] = v
            else:
                problems.append(f"{name} must be an integer in 1..{MAX_TILES}, not {_show(v)}")
    if "min_tiles" in out and "max_tiles" in out and out["min_tiles"] > out["max_tiles"]:
        problems.append(f"min_tiles ({out['min_tiles']}) is larger than max_tiles ({out['max_tiles']})")
    if (v := obj.get("max_new_tokens")) is not None:
        if _int_in(v, 1, None):
            out["max_new_tokens"] = v
        else:
            problems.append(f"max_new_tokens must be an integer >= 1, not {_show(v)}")
    if (v := obj.get("temperature")) is not None:
        if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
            out["temperature"] = float(v)
        else:
            problems.append(f"temperature must be a number >= 0, not {_show(v)}")
    if (v := obj.get("seed")) is not None:
        if _int_in(v, 0, _SEED_LIMIT - 1):
            out["seed"] = v
        else:
            problems.append(f"seed must be an integer in 0..2**64-1, not {_show(v)}")
    return out


def _show(value: object) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------------------
# Rows


def error_row(
    line: int,
    id: JsonScalar,
    err: BaseException,
    *,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The output row of a record that failed: ``{"id", "line", "error": {"type", "message"}}`` (+ settings),
    then the record's ``extra`` fields as ``result_row`` echoes them.

    ``error.type`` is ``err.kind`` for a ``RecordError`` (e.g. ``invalid_record``), else the exception's class
    name, so unexpected failures stay distinguishable from bad input.
    """
    kind = err.kind if isinstance(err, RecordError) else type(err).__name__
    row: dict[str, Any] = {
        "id": id,
        "line": line,
        "error": {"type": kind, "message": str(err) or type(err).__name__,
                  **(err.details if isinstance(err, RecordError) else {})},
    }
    if settings is not None:
        row["settings"] = dict(settings)
    return _echo(row, extra or {})


def is_missing_image(error_type: str, message: str) -> bool:
    """Whether an error row's ``type`` and ``message`` say the image file does not exist (``load_image``'s)."""
    return error_type == ImageError.kind and message.startswith("image not found")


def result_row(
    record: Record, result: Mapping[str, Any], *, settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The output row of a record: id and line, the engine's ``result`` fields, settings, then echoed extras.

    The record's own id and line win over any in ``result``; ``settings`` is what ``scan_output`` fingerprints.
    """
    row: dict[str, Any] = {"id": record.id, "line": record.line}
    row.update((k, v) for k, v in result.items() if k not in ("id", "line"))
    if settings is not None:
        row["settings"] = dict(settings)
    return _echo(row, record.extra)


def shown_record(record: Record) -> dict[str, Any]:
    """What ``--kept`` rows carry of their input so that ``ptp show`` can draw them from the rows alone: the
    image (its absolute path; None for an image given as bytes), the question and any tiling override."""
    shown: dict[str, Any] = {"image": str(record.image) if isinstance(record.image, Path) else None,
                             "question": record.question}
    shown.update((k, record.overrides[k]) for k in ("max_tiles", "min_tiles") if k in record.overrides)
    return shown


def _echo(row: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Add a record's extra fields to its row: at the top level, or under "input" when the name is taken."""
    kept = {k: v for k, v in extra.items() if k in OUTPUT_FIELDS}
    row.update((k, v) for k, v in extra.items() if k not in OUTPUT_FIELDS)
    if kept:
        row["input"] = kept
    return row


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit hash of the settings that change results (key order does not matter).

    Values are hashed as their JSON form, so callers should normalise types (``1`` and ``1.0`` differ).
    """
    return hashlib.sha1(orjson.dumps(dict(settings), option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
