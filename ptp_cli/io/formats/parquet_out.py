"""Parquet output (``-o results.parquet``): a folder of part files, as Spark, Dask and Ray write a dataset.

Rows are buffered and written as one part (one row group) at a time, each to a temporary name and renamed
into place, so a killed run leaves only whole parts: every row in a part is kept, and ``--resume`` redoes
the rows that were still in the buffer. Parts are written after 1,000 rows or when a flush interval has
passed (2 s at first, doubling up to a minute), and the parts are merged into one when a run ends normally.
``pandas.read_parquet``, ``pyarrow.parquet.read_table`` and DuckDB read the folder as one table.

Columns: ``id`` (text; ``id_number`` holds it when it was an integer), ``line``, ``answer``,
``finish_reason``, ``method``, ``logprob``, ``error`` (struct of type, message and JSON details; null for a
result), ``tokens`` (struct of counts), ``timing`` (map of seconds), ``settings``, ``flops``, ``pruning``,
``kept``, ``record``, ``logprobs``, ``input`` (JSON text), then the input's own fields (text: strings as they
are, other values as JSON), fixed by the first part; fields first seen later go to ``more`` (a JSON object).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from ptp_cli.errors import UsageError
from ptp_cli.io.formats.arrow import pyarrow
from ptp_cli.io.records import OUTPUT_FIELDS, fingerprint
from ptp_cli.io.resume import ResumeState, settings_diff

PART_ROWS = 1000
FIRST_FLUSH_S, LAST_FLUSH_S = 2.0, 60.0
_JSON_COLUMNS = ("settings", "flops", "pruning", "kept", "record", "logprobs", "input")
_TOKEN_FIELDS = ("visual_before", "visual_after", "tiles", "prompt", "generated")
_FIXED = ("id", "id_number", "line", "answer", "finish_reason", "method", "logprob", "error", "tokens", "timing",
          *_JSON_COLUMNS, "more")


def _schema(extras: list[str]) -> Any:
    pa = pyarrow()
    fields = [
        ("id", pa.string()), ("id_number", pa.int64()), ("line", pa.int64()), ("answer", pa.string()),
        ("finish_reason", pa.string()), ("method", pa.string()), ("logprob", pa.float64()),
        ("error", pa.struct([("type", pa.string()), ("message", pa.string()), ("details", pa.string())])),
        ("tokens", pa.struct([*((n, pa.int64()) for n in _TOKEN_FIELDS), ("visual_per_tile", pa.list_(pa.int64()))])),
        ("timing", pa.map_(pa.string(), pa.float64())),
        *((n, pa.string()) for n in _JSON_COLUMNS), ("more", pa.string()),
        *((n, pa.string()) for n in extras),
    ]
    return pa.schema(fields)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else orjson.dumps(value).decode()


def flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ptp row as Parquet cells (the extras stay under their own names, as text)."""
    rid = row.get("id")
    err = row.get("error")
    tokens = row.get("tokens")
    out: dict[str, Any] = {
        "id": _text(rid), "id_number": rid if isinstance(rid, int) and not isinstance(rid, bool) else None,
        "line": row.get("line"), "answer": row.get("answer"), "finish_reason": row.get("finish_reason"),
        "method": row.get("method"), "logprob": row.get("logprob"),
        "error": None if err is None else {
            "type": err.get("type"), "message": err.get("message"),
            "details": _json({k: v for k, v in err.items() if k not in ("type", "message")} or None)},
        "tokens": None if tokens is None else {**{n: tokens.get(n) for n in _TOKEN_FIELDS},
                                               "visual_per_tile": tokens.get("visual_per_tile")},
        "timing": None if row.get("timing") is None else [(k, float(v)) for k, v in row["timing"].items()],
        **{n: _json(row.get(n)) for n in _JSON_COLUMNS},
    }
    extras = {k: _text(v) for k, v in row.items() if k not in OUTPUT_FIELDS}
    out["extras"] = extras  # placed into columns at write time, when the part's columns are known
    return out


def unflatten(cells: Mapping[str, Any]) -> dict[str, Any]:
    """Parquet cells back into a ptp row (what ``ptp eval`` and ``ptp show`` read)."""
    row: dict[str, Any] = {"id": cells["id"] if cells.get("id_number") is None else cells["id_number"],
                           "line": cells.get("line")}
    for name in ("answer", "finish_reason", "method", "logprob"):
        if cells.get(name) is not None:
            row[name] = cells[name]
    if (err := cells.get("error")) is not None:
        row["error"] = {"type": err["type"], "message": err["message"], **orjson.loads(err.get("details") or "{}")}
    if (tokens := cells.get("tokens")) is not None:
        row["tokens"] = dict(tokens)
    if cells.get("timing") is not None:
        row["timing"] = dict(cells["timing"])
    for name in _JSON_COLUMNS:
        if cells.get(name) is not None:
            row[name] = orjson.loads(cells[name])
    row.update((k, v) for k, v in cells.items() if k not in _FIXED and v is not None)
    row.update(orjson.loads(cells["more"]) if cells.get("more") else {})
    return row


_MARKER = ".merge.json"  # names the merged part and the parts it replaces, while a merge is under way


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def recover(folder: Path) -> None:
    """Finish or undo what a run killed mid-write left: temporary parts go (their rows are redone); a merge
    whose merged part is in place deletes the parts it replaced, so no row is there twice."""
    marker = folder / _MARKER
    if marker.is_file():
        plan = orjson.loads(marker.read_bytes())
        if (folder / plan["final"]).is_file():
            for name in plan["parts"]:
                (folder / name).unlink(missing_ok=True)
        marker.unlink()
    for stale in folder.glob(".part-*.tmp"):
        stale.unlink()


def read_rows(source: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The rows of a ptp Parquet output (a folder of parts, or one file), in order."""
    import pyarrow.parquet as pq

    pa = pyarrow()
    path = Path(source)
    files = _parts(path) if path.is_dir() else [path]
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=256):
                yield from (unflatten(cells) for cells in batch.to_pylist())
        except (OSError, pa.ArrowException) as e:
            raise UsageError(f"cannot read {f} as a ptp Parquet output: {e}") from None


class ParquetSink:
    """The ``OrderedWriter`` sink of a Parquet output folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, resume: bool, part_rows: int = PART_ROWS) -> None:
        self._pa = pyarrow()
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            if resume:
                raise UsageError(f"--resume: {self.path} is a file, not the folder a ptp Parquet output is")
            self.path.unlink()
        self.path.mkdir(exist_ok=True)
        recover(self.path)
        if not resume:
            for old in _parts(self.path):
                old.unlink()
        parts = _parts(self.path)
        self._next = int(parts[-1].stem.removeprefix("part-")) + 1 if parts else 0
        self._extras: list[str] | None = None
        if parts:
            import pyarrow.parquet as pq

            self._extras = [n for n in pq.read_schema(parts[0]).names if n not in _FIXED]
        self.part_rows = part_rows
        self._buffer: list[dict[str, Any]] = []
        self._interval = FIRST_FLUSH_S
        self._last = time.monotonic()
        self._started_parts = self._next

    def encode(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return flatten(row)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._buffer.extend(rows)
        if len(self._buffer) >= self.part_rows or time.monotonic() - self._last >= self._interval:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        if self._extras is None:
            seen: dict[str, None] = {}
            for r in self._buffer:
                seen.update(dict.fromkeys(r["extras"]))
            self._extras = list(seen)
        columns = set(self._extras)
        cells = []
        for r in self._buffer:
            extras = r["extras"]
            more = {k: v for k, v in extras.items() if k not in columns}
            cells.append({**{k: v for k, v in r.items() if k != "extras"},
                          **{k: extras.get(k) for k in self._extras}, "more": _json(more or None)})
        self._write_part(self._pa.Table.from_pylist(cells, schema=_schema(self._extras)))
        self._buffer.clear()
        self._last = time.monotonic()
        self._interval = min(2 * self._interval, LAST_FLUSH_S)

    def _write_part(self, table: Any, *, number: int | None = None) -> None:
        import pyarrow.parquet as pq

        number = self._next if number is None else number
        final = self.path / f"part-{number:06d}.parquet"
        tmp = self.path / f".part-{number:06d}.tmp"
        pq.write_table(table, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic: a reader (or --resume) sees a whole part or none
        self._next = max(self._next, number + 1)

    def close(self) -> None:
        self.flush()
        self._merge()

    def _merge(self) -> None:
        """Merge the parts into one (a finished run is one file), part by part, never all rows at once."""
        import pyarrow.parquet as pq

        parts = _parts(self.path)
        if len(parts) < 2:
            return
        tmp = self.path / f".part-{self._next:06d}.tmp"
        schema = pq.read_schema(parts[0])
        with pq.ParquetWriter(tmp, schema) as out:
            for p in parts:
                out.write_table(pq.read_table(p, schema=schema))
        final = self.path / f"part-{self._next:06d}.parquet"
        marker = self.path / _MARKER
        staged = self.path / f"{_MARKER}.tmp"
        staged.write_bytes(orjson.dumps({"final": final.name, "parts": [p.name for p in parts]}))
        os.replace(staged, marker)
        os.replace(tmp, final)
        recover(self.path)


def scan_parquet(
    path: str | os.PathLike[str], *, settings: Mapping[str, Any], force: bool, retry_errors: bool
) -> ResumeState:
    """``--resume`` for a Parquet output folder: the positions done, the settings check, and (with
    ``retry_errors``) the error rows taken out of their parts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pa = pyarrow()
    folder = Path(path)
    if not folder.exists():
        return ResumeState(frozenset(), 0, 0, frozenset(), 0)
    if not folder.is_dir():
        raise UsageError(f"--resume: {folder} is a file, not the folder a ptp Parquet output is")
    recover(folder)
    done: set[int] = set()
    failed: set[int] = set()
    fingerprints: dict[str, dict[str, Any]] = {}
    with_errors: list[Path] = []
    rows = 0
    for part in _parts(folder):
        try:
            table = pq.read_table(part, columns=["line", "error", "settings"])
        except (OSError, pa.ArrowException, KeyError) as e:
            raise UsageError(f"{part}: not a ptp Parquet part ({e}); refusing to resume into it") from None
        rows += table.num_rows
        lines, settings_col = table["line"].to_pylist(), table["settings"].to_pylist()
        errors = table["error"].is_valid().to_pylist()
        for line, is_err in zip(lines, errors, strict=True):
            (failed if is_err else done).add(line)
        for text in set(settings_col) - {None}:
            s = orjson.loads(text)
            fingerprints.setdefault(fingerprint(s), s)
        if any(errors):
            with_errors.append(part)
    want = fingerprint(settings)
    others = {fp: s for fp, s in fingerprints.items() if fp != want}
    if others and not force:
        what = "; ".join(settings_diff(next(iter(others.values())), settings))
        raise UsageError(f"--resume: {folder} holds results of other settings ({what}); mixing them is refused: "
                         "use --force-resume or another --output")
    if retry_errors:
        for part in with_errors:
            table = pq.read_table(part)
            kept = table.filter(pc.is_null(table["error"]))
            tmp = part.with_name(f".{part.stem}.tmp")
            pq.write_table(kept, tmp)
            os.replace(tmp, part)
        rows -= len(failed)
    else:
        done |= failed
    return ResumeState(frozenset(done), rows, len(failed), frozenset(fingerprints), 0)
