"""Where records come from and rows go: JSONL, Parquet, Arrow (Hugging Face ``save_to_disk``), WebDataset shards
and OpenAI batch files.

    from ptp_cli.io.formats import Columns, open_input
    reader = open_input("data.parquet", columns=Columns(image="img"))
    rows = Pipeline.load(RunConfig(model="tiny")).infer(reader.records())

``open_input`` picks the format from the path (or ``format=``) and checks the source at once (a file that is
not what its name says is a ``UsageError``); ``output_sink`` opens where rows go, ``scan`` reads back what an
earlier run wrote (``--resume``), and ``read_rows`` reads any output as ptp rows (``ptp eval``, ``ptp show``).
Only the Parquet and Arrow modules import pyarrow, and only when such a file is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import orjson

from ptp_cli.errors import UsageError
from ptp_cli.io.formats.base import INPUT_FORMATS, OUTPUT_FORMATS, Columns, Item, Reader, selected
from ptp_cli.io.output import JsonlSink, RowSink
from ptp_cli.io.records import iter_records
from ptp_cli.io.resume import ResumeState, scan_output

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "Columns",
    "Item",
    "Reader",
    "detect_input_format",
    "iter_rows",
    "open_input",
    "output_format",
    "output_sink",
    "read_rows",
    "scan",
]


def _looks_like_batch(path: Path) -> bool:
    """A .jsonl whose first non-blank line is an object with custom_id and body: an OpenAI batch file."""
    try:
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    obj = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj
    except (OSError, orjson.JSONDecodeError):
        return False
    return False


def detect_input_format(source: str) -> str:
    """The format of ``source`` from its name (and, for a folder or a .jsonl, a look inside)."""
    if source == "-":
        return "jsonl"
    name = source.lower()
    path = Path(source).expanduser()
    if name.endswith((".parquet", ".pq")) or (any(c in source for c in "*?[") and ".parquet" in name):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    if name.endswith(".tar") or name.endswith(".tar}"):
        return "webdataset"
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() or any(path.glob("*.arrow")):
            return "arrow"
        if any(path.glob("*.tar")):
            return "webdataset"
        if any(path.rglob("*.parquet")):
            return "parquet"
        raise UsageError(f"{source} is a folder with no Parquet, Arrow or .tar files; give --input-format")
    if path.is_file() and _looks_like_batch(path):
        return "openai"
    return "jsonl"


class JsonlReader:
    """The JSONL reader of ``records.iter_records`` behind the common interface."""

    format = "jsonl"

    def __init__(self, source: str, *, base_dir: str | None) -> None:
        self.source, self.base_dir = source, base_dir

    def records(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> Iterator[Item]:
        return iter_records(self.source, base_dir=self.base_dir, shard=shard, skip_lines=skip)

    def count(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> int | None:
        if self.source == "-":
            return None
        with open(self.source, "rb") as f:
            positions = [n for n, raw in enumerate(f, start=1) if raw.strip()]
        return sum(selected(i, p, shard, skip) for i, p in enumerate(positions))


def open_input(source: str, *, format: str | None = None, columns: Columns | None = None,
               base_dir: str | None = None) -> Reader:
    """Open ``source`` for reading records; ``format`` None: from its name. Raises ``UsageError`` for a source
    that cannot be read or is not what its format says."""
    fmt = format or detect_input_format(source)
    columns = columns or Columns()
    if fmt not in INPUT_FORMATS:
        raise UsageError(f"--input-format {fmt!r}: choose one of {', '.join(INPUT_FORMATS)}")
    if source == "-" and fmt != "jsonl" and fmt != "openai":
        raise UsageError(f"--input-format {fmt} reads files, not stdin")
    if fmt in ("parquet", "arrow"):
        from ptp_cli.io.formats.arrow import TableReader

        return TableReader(source, format=fmt, columns=columns, base_dir=base_dir)
    if fmt == "webdataset":
        from ptp_cli.io.formats.webdataset import ShardReader

        return ShardReader(source, columns=columns)
    if fmt == "openai":
        from ptp_cli.io.formats.openai import BatchReader

        return BatchReader(source, base_dir=base_dir)
    if source != "-":
        try:
            with open(source, "rb"):
                pass
        except OSError as e:
            raise UsageError(f"cannot read input {source}: {e.strerror or e}") from None
    return JsonlReader(source, base_dir=base_dir)


def iter_rows(source: str, *, format: str | None = None) -> Iterator[tuple[int, dict[str, Any]]] | None:
    """(position, fields) of every record of a Parquet, Arrow or WebDataset source, as JSON values without the
    image bytes (``ptp eval`` reads gold answers from them); None for a JSONL source (read it as JSONL)."""
    fmt = format or detect_input_format(source)
    if fmt in ("parquet", "arrow"):
        from ptp_cli.io.formats.arrow import TableReader

        return TableReader(source, format=fmt, columns=None, base_dir=None).rows()
    if fmt == "webdataset":
        from ptp_cli.io.formats.webdataset import ShardReader

        return ShardReader(source, columns=Columns()).rows()
    if fmt == "openai":
        raise UsageError(f"{source} is an OpenAI batch file: its requests carry no gold answers")
    return None


def output_format(output: str | None, *, given: str | None, input_format: str) -> str:
    """The output format: ``given``, else Parquet for a ``.parquet`` output, else the batch output format for
    a batch input, else JSONL."""
    if given is not None:
        if given not in OUTPUT_FORMATS:
            raise UsageError(f"--output-format {given!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
        fmt = given
    elif output is not None and output.lower().endswith((".parquet", ".pq")):
        fmt = "parquet"
    else:
        fmt = "openai" if input_format == "openai" else "jsonl"
    if fmt == "parquet" and output is None:
        raise UsageError("--output-format parquet needs --output DIR.parquet (Parquet does not go to stdout)")
    return fmt


def output_sink(output: str | None, *, format: str, resume: bool, stdout: IO[Any]) -> RowSink:
    """Where rows go. A JSONL or batch file is opened here (append with ``resume``); the caller closes the
    sink (and, for a file, the sink closes it)."""
    if format == "parquet":
        from ptp_cli.io.formats.parquet_out import ParquetSink

        assert output is not None
        return ParquetSink(output, resume=resume)
    convert = None
    if format == "openai":
        from ptp_cli.io.formats.openai import batch_row

        convert = batch_row
    if output is None:
        return JsonlSink(stdout, convert=convert)
    try:
        stream = open(output, "ab" if resume else "wb")  # noqa: SIM115 (the sink owns it)
    except OSError as e:
        raise UsageError(f"cannot write --output {output}: {e.strerror or e}") from None
    return _OwnedJsonl(stream, convert=convert)


class _OwnedJsonl(JsonlSink):
    """A JSONL sink on a file it opened, and closes."""

    def __init__(self, stream: IO[bytes], *, convert: Any) -> None:
        super().__init__(stream, convert=convert)
        self._file = stream

    def close(self) -> None:
        super().close()
        self._file.close()


def scan(output: str, *, format: str, settings: Mapping[str, Any], force: bool, retry_errors: bool) -> ResumeState:
    """``--resume``: what an earlier run left in ``output`` (repaired), for any output format."""
    if format == "parquet":
        from ptp_cli.io.formats.parquet_out import scan_parquet

        return scan_parquet(output, settings=settings, force=force, retry_errors=retry_errors)
    if format == "openai":
        from ptp_cli.io.formats.openai import read_batch_row

        return scan_output(output, settings=settings, force=force, retry_errors=retry_errors, read_row=read_batch_row)
    return scan_output(output, settings=settings, force=force, retry_errors=retry_errors)


def read_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]] | None:
    """The rows of a ptp output in Parquet or batch format, as ptp rows; None for a JSONL output (read it as
    JSONL). Used by ``ptp eval`` and ``ptp show``."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")) or (p.is_dir() and any(p.glob("part-*.parquet"))):
        from ptp_cli.io.formats.parquet_out import read_rows as read_parquet_rows

        return read_parquet_rows(p)
    if p.is_file() and _first_is_batch_output(p):
        from ptp_cli.io.formats.openai import answer_row

        return (answer_row(orjson.loads(raw)) for raw in p.open("rb") if raw.strip())
    return None


def _first_is_batch_output(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    obj = orjson.loads(raw)
                    return isinstance(obj, dict) and "custom_id" in obj and "response" in obj
    except (OSError, orjson.JSONDecodeError):
        return False
    return False
