"""Resuming (``ptp infer --resume``): what an earlier run left in its output file.

``scan_output`` cuts off a torn last line, checks that the earlier run used the same settings (and, when it did
not, says which settings differ), and returns the input lines already done.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ptp_cli.errors import UsageError
from ptp_cli.io.records import fingerprint


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
    settings_fingerprint: str | None = None,
    settings: Mapping[str, Any] | None = None,
    force: bool = False,
    retry_errors: bool = False,
    read_row: Callable[[dict[str, Any]], tuple[int | None, str | None, bool]] | None = None,
) -> ResumeState:
    """Read an earlier run's output for ``--resume``: repair it in place and return the lines already done.

    - A missing or empty file gives an empty state.
    - A torn last line (no trailing newline, or not valid JSON: the run was killed mid-write) is cut off the
      file, and its record is redone. Any other line that is not a JSON object with an integer ``line`` raises
      ``UsageError`` naming it: the file is not a ptp output, and we do not touch it.
    - Error rows count as done. With ``retry_errors``, they do not, and the file is rewritten without them
      (atomically), so after the retry every line has exactly one row.
    - Rows carry ``settings``; if their ``fingerprint`` differs from ``settings_fingerprint`` (or from that of
      ``settings``, and then the message lists what differs), raise ``UsageError`` unless ``force``.
      ``None`` for both skips the check.

    ``read_row`` reads a row of another JSON layout (the OpenAI batch output) as ``(line, settings
    fingerprint, is an error)``, line None for a row that is not ptp's.

    Nothing is modified before every check has passed.
    """
    path = Path(path)
    if settings is not None:
        settings_fingerprint = fingerprint(settings)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return ResumeState(frozenset(), 0, 0, frozenset(), 0)
    except OSError as e:
        raise UsageError(f"cannot read {path} to resume: {e.strerror or e}") from e

    done: set[int] = set()
    fingerprints: set[str] = set()
    other: dict[str, Any] | None = None  # the settings of a row whose fingerprint differs
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
            fp = None
            if read_row is not None and isinstance(row, dict):
                line, fp, is_error = read_row(row)
            else:
                line = row.get("line") if isinstance(row, dict) else None
                is_error = isinstance(row, dict) and row.get("error") is not None
            if not (isinstance(line, int) and not isinstance(line, bool) and line >= 1):
                raise UsageError(
                    f"{path}, line {n}: not a ptp result row (no integer 'line'); refusing to resume into it"
                )
            good_end = offset
            rows += 1
            if fp is not None:
                fingerprints.add(fp)
            elif isinstance(row_settings := row.get("settings"), dict):
                fingerprints.add(fp := fingerprint(row_settings))
                if other is None and fp != settings_fingerprint:
                    other = row_settings
            if is_error:
                error_at.add(n)
                retried.add(line)
            else:
                done.add(line)
        size = offset

    if settings_fingerprint is not None and not force and fingerprints - {settings_fingerprint}:
        if settings is not None and other is not None:
            what = "; ".join(settings_diff(other, settings))
        else:
            what = f"fingerprints {', '.join(sorted(fingerprints))} -> {settings_fingerprint}"
        raise UsageError(
            f"--resume: {path} holds results of other settings ({what}); mixing them is refused: "
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


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"name old -> new"`` for every setting that differs (``unset`` where one side lacks it), sorted."""
    missing = object()
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, missing), new.get(name, missing)
        if a != b or type(a) is not type(b):
            show = [("unset" if v is missing else orjson.dumps(v).decode()) for v in (a, b)]
            changes.append(f"{name} {show[0]} -> {show[1]}")
    return changes


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
