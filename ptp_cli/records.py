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
- optional overrides of the run's options: ``max_tiles``, ``min_tiles`` (int in 1..40),
  ``max_new_tokens`` (int >= 1), ``temperature`` (number >= 0), ``seed`` (int in 0..2**64-1). ``null`` means
  "use the run's value".
- any other field is echoed into the record's result row under the same name, except names in
  ``OUTPUT_FIELDS``, which the output reserves: those are dropped.

Writing (``OrderedWriter``) takes rows that finish out of order and writes them in input order through a
bounded reorder buffer, one orjson line per row, flushed after every burst.

Resuming (``scan_output``) reads an output file left by an earlier run, cuts off a torn last line, checks
that the earlier run used the same settings, and returns the input lines already done.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import orjson

from ptp_cli.errors import InvalidRecordError, RecordError, UsageError

JsonScalar = str | int | float | bool

# Top-level names of an output row; an input's extra field with one of these names is not echoed.
OUTPUT_FIELDS: frozenset[str] = frozenset(
    {
        "id",
        "line",
        "answer",
        "finish_reason",
        "kept",
        "error",
        "tokens",
        "timing",
        "flops",
        "logprob",
        "logprobs",
        "method",
        "settings",
    }
)
# Fields the reader interprets itself (never echoed as extras).
INPUT_FIELDS: frozenset[str] = frozenset(
    {"id", "image", "question", "prompt", "max_tiles", "min_tiles", "max_new_tokens", "temperature", "seed"}
)
MAX_TILES_LIMIT = 40  # InternVL2 was trained with up to 40 tiles; more only costs memory
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
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields to echo; never an OUTPUT_FIELDS name


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
    overrides = _overrides(obj, problems)
    if problems:
        return BadRecord(line, rid, InvalidRecordError("; ".join(problems)))
    assert image is not None and question is not None
    extra = {k: v for k, v in obj.items() if k not in INPUT_FIELDS and k not in OUTPUT_FIELDS}
    return Record(line=line, id=rid, image=image, question=question, overrides=overrides, extra=extra)


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
            if _int_in(v, 1, MAX_TILES_LIMIT):
                out[name] = v
            else:
                problems.append(f"{name} must be an integer in 1..{MAX_TILES_LIMIT}, not {_show(v)}")
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
    line: int, id: JsonScalar, err: BaseException, *, settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The output row of a record that failed: ``{"id", "line", "error": {"type", "message"}}`` (+ settings).

    ``error.type`` is ``err.kind`` for a ``RecordError`` (e.g. ``invalid_record``), else the exception's class
    name, so unexpected failures stay distinguishable from bad input.
    """
    kind = err.kind if isinstance(err, RecordError) else type(err).__name__
    row: dict[str, Any] = {
        "id": id,
        "line": line,
        "error": {"type": kind, "message": str(err) or type(err).__name__},
    }
    if settings is not None:
        row["settings"] = dict(settings)
    return row


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
    row.update(record.extra)  # never collides: extras exclude OUTPUT_FIELDS
    return row


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit hash of the settings that change results (key order does not matter).

    Values are hashed as their JSON form, so callers should normalise types (``1`` and ``1.0`` differ).
    """
    return hashlib.sha1(orjson.dumps(dict(settings), option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# Writing


class OrderedWriter:
    """Write result rows in sequence order (0, 1, 2, ...) although they are ``put`` in any order.

    ``seq`` is the order in which the records were read in this run (``BadRecord``s included). A row waits in
    the buffer until every row before it has arrived; then the contiguous run is written in one ``write``
    and flushed, so ``tail -f`` sees rows promptly and a SIGKILL loses at most a torn last line, which
    ``scan_output`` repairs.

    Memory is bounded: ``put(seq)`` requires ``can_accept(seq)``, i.e. ``seq < next_seq + window``; a producer
    that gets ``False`` must finish its in-flight records (all of which have smaller seqs) before reading more.

    ``stream`` is a binary stream (a text stream is written through its ``.buffer``); the writer never closes
    it. A closed pipe (``ptp infer ... | head``) raises ``BrokenPipeError`` from ``put``/``close``, so the CLI
    can exit quietly; the writer then refuses further rows.
    """

    def __init__(self, stream: IO[bytes] | IO[str], *, window: int = 1024) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if isinstance(stream, io.TextIOBase):
            stream.flush()  # anything already written as text goes before our bytes
            stream = stream.buffer  # type: ignore[attr-defined]
        self._stream: IO[bytes] = stream  # type: ignore[assignment]
        self.window = window
        self._next = 0
        self._buffer: dict[int, bytes] = {}
        self._written = 0
        self._closed = False

    @property
    def next_seq(self) -> int:
        """The seq the writer waits for."""
        return self._next

    @property
    def pending(self) -> int:
        """Rows buffered, waiting for an earlier one."""
        return len(self._buffer)

    @property
    def written(self) -> int:
        """Rows written so far."""
        return self._written

    def can_accept(self, seq: int) -> bool:
        """Whether ``put(seq)`` fits the window now."""
        return seq < self._next + self.window

    def put(self, seq: int, row: Mapping[str, Any]) -> None:
        """Buffer the row of ``seq``; write every row that is now contiguous."""
        if self._closed:
            raise ValueError("put() on a closed OrderedWriter")
        if seq < self._next or seq in self._buffer:
            raise ValueError(f"seq {seq} was already put")
        if not self.can_accept(seq):
            raise ValueError(
                f"seq {seq} is beyond the window (next {self._next}, window {self.window}); check can_accept()"
            )
        self._buffer[seq] = _dumps(row)  # serialise now: bytes are smaller, and a bad row fails here
        if seq == self._next:
            self._drain()

    def _drain(self) -> None:
        chunks = []
        while self._next in self._buffer:
            chunks.append(self._buffer.pop(self._next))
            self._next += 1
        if chunks:
            self._write(b"".join(chunks))
            self._written += len(chunks)

    def _write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()
        except BrokenPipeError:
            self._closed = True
            self._buffer.clear()
            raise

    def close(self) -> None:
        """Write what is buffered and flush. Rows after a missing seq are still written (in order, so no
        result is lost), then ``RuntimeError`` names the missing seqs: every record must get a row."""
        if self._closed:
            return
        self._closed = True
        if not self._buffer:
            self._stream.flush()
            return
        seqs = sorted(self._buffer)
        missing = sorted(set(range(self._next, seqs[-1])) - set(seqs))
        self._write(b"".join(self._buffer.pop(s) for s in seqs))
        self._written += len(seqs)
        self._next = seqs[-1] + 1
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise RuntimeError(
            f"{len(missing)} row(s) never arrived (seq {shown}); later rows were written anyway"
        )

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: save what we can, but do not mask the original error with a gap or a broken pipe.
        with contextlib.suppress(RuntimeError, OSError):
            self.close()


def _dumps(row: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError as e:
        # One unserialisable row (say a stray tensor) must not end the run: keep its place with an error row.
        err = RecordError(f"result row is not JSON-serialisable: {e}", kind="serialization_error")
        fallback = error_row(_scalar_or_none(row.get("line")), _scalar_or_none(row.get("id")), err)
        return orjson.dumps(fallback, option=orjson.OPT_APPEND_NEWLINE)


def _scalar_or_none(value: object) -> Any:
    return value if isinstance(value, str | int | float | bool) else None


# ---------------------------------------------------------------------------------------------------------
# Resuming


@dataclass(frozen=True, slots=True)
class ResumeState:
    """What an earlier run left in the output file (after repair)."""

    done: frozenset[int]  # input line numbers that have a row; pass as iter_records(skip_lines=...)
    rows: int  # rows kept in the file
    error_rows: int  # error rows found (removed from the file when retry_errors)
    fingerprints: frozenset[str]  # settings fingerprints of the rows (normally zero or one)
    torn_bytes: int  # bytes of a torn last line cut off the file (0: none)


def scan_output(
    path: str | os.PathLike[str],
    *,
    settings_fingerprint: str | None,
    force: bool = False,
    retry_errors: bool = False,
) -> ResumeState:
    """Read an earlier run's output for ``--resume``: repair it in place and return the lines already done.

    - A missing or empty file gives an empty state.
    - A torn last line (no trailing newline, or not valid JSON: the run was killed mid-write) is cut off the
      file, and its record is redone. Any other line that is not a JSON object with an integer ``line`` raises
      ``UsageError`` naming it: the file is not a ptp output, and we do not touch it.
    - Error rows count as done. With ``retry_errors``, they do not, and the file is rewritten without them
      (atomically), so after the retry every line has exactly one row.
    - Rows carry ``settings``; if their ``fingerprint`` differs from ``settings_fingerprint``, raise
      ``UsageError`` unless ``force``. ``None`` skips the check.

    Nothing is modified before every check has passed.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return ResumeState(frozenset(), 0, 0, frozenset(), 0)
    except OSError as e:
        raise UsageError(f"cannot read {path} to resume: {e.strerror or e}") from e

    done: set[int] = set()
    fingerprints: set[str] = set()
    error_at: set[int] = set()  # physical lines (of the output file) holding error rows
    retried: set[int] = set()  # input lines with an error row
    rows = 0
    good_end = 0  # byte offset just after the last good line
    bad: tuple[int, str] | None = None  # a bad line is fine only if it is the last one
    with f:
        offset = 0
        for n, raw in enumerate(f, start=1):
            if bad is not None:
                raise UsageError(
                    f"{path}, line {bad[0]}: {bad[1]}; not a ptp output file, refusing to resume into it"
                )
            offset += len(raw)
            if not raw.endswith(b"\n"):
                bad = (n, "torn line")  # the last line, by construction
                break
            if not raw.strip():
                good_end = offset
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError:
                bad = (n, "invalid JSON")
                continue
            line = row.get("line") if isinstance(row, dict) else None
            if not _int_in(line, 1, None):
                raise UsageError(
                    f"{path}, line {n}: not a ptp result row (no integer 'line'); refusing to resume into it"
                )
            good_end = offset
            rows += 1
            if isinstance(settings := row.get("settings"), dict):
                fingerprints.add(fingerprint(settings))
            if row.get("error") is not None:
                error_at.add(n)
                retried.add(line)
            else:
                done.add(line)
        size = offset

    if settings_fingerprint is not None and not force and fingerprints - {settings_fingerprint}:
        found = ", ".join(sorted(fingerprints))
        raise UsageError(
            f"{path}: --resume would mix results of different settings (file: {found}, now: {settings_fingerprint}); "
            "use --force-resume or another --output"
        )

    if retry_errors and error_at:
        _rewrite_without(path, lines=error_at, end=good_end)
        rows -= len(error_at)
    elif good_end < size:
        with path.open("r+b") as f:
            f.truncate(good_end)
    if not retry_errors:
        done |= retried
    return ResumeState(frozenset(done), rows, len(error_at), frozenset(fingerprints), size - good_end)


def _rewrite_without(path: Path, *, lines: set[int], end: int) -> None:
    """Copy the file's first ``end`` bytes minus the given physical lines to a temp file, then swap it in."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, path.open("rb") as src:
            offset = 0
            for n, raw in enumerate(src, start=1):
                if offset >= end:
                    break
                offset += len(raw)
                if n not in lines:
                    out.write(raw)
            out.flush()
            os.fsync(out.fileno())  # the old file is replaced next: make sure the new one is on disk
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
