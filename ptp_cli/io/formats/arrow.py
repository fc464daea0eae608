"""Parquet and Arrow inputs: a Parquet file, a folder of part files or a glob; a Hugging Face ``datasets``
folder written by ``save_to_disk`` (Arrow IPC stream files listed in its ``state.json``) or one ``.arrow`` file.

Rows are read with pyarrow in small record batches, so memory holds a batch of images at a time, never the
file; a Parquet row group whose rows are all skipped (``--resume``) is not read at all. pyarrow is imported
here only, when such an input is opened.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptp_cli.errors import InvalidRecordError, UsageError
from ptp_cli.io.formats.base import Columns, Item, json_safe, selected
from ptp_cli.io.formats.table import choose_columns, row_record
from ptp_cli.io.records import BadRecord

BATCH_ROWS = 32  # rows decoded at once: bounds memory by a few dozen images
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"


def pyarrow() -> Any:
    """The pyarrow module, or a one-line usage error naming the extra that brings it."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UsageError("Parquet and Arrow files need pyarrow: pip install 'ptp-cli[parquet]'") from None
    return pa


def _magic(path: Path, *, tail: bool = False) -> bytes:
    try:
        with path.open("rb") as f:
            if tail:
                f.seek(max(0, path.stat().st_size - 4))
            return f.read(6 if not tail else 4)
    except OSError as e:
        raise UsageError(f"cannot read input {path}: {e.strerror or e}") from None


def parquet_files(source: str) -> list[Path]:
    """The Parquet files of ``source`` (a file, a folder of ``*.parquet`` parts or a glob), sorted; each checked
    to be Parquet by its magic bytes, so a mislabelled file is a usage error before any model loads."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = [path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise UsageError(f"no Parquet files in {source}")
    for f in files:
        if _magic(f)[:4] != _PARQUET_MAGIC or _magic(f, tail=True) != _PARQUET_MAGIC:
            raise UsageError(f"{f} is not a Parquet file (no PAR1 marks; an unfinished write, or another format)")
    return files


def arrow_files(source: str) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder (from its ``state.json``) or one ``.arrow`` file."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise UsageError(f"{source} holds a DatasetDict; give one split's folder ({', '.join(splits) or 'none'})")
        try:
            state = json.loads((path / "state.json").read_text())
            files = [path / d["filename"] for d in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            files = sorted(path.glob("data-*.arrow"))
    else:
        files = [path]
    if not files:
        raise UsageError(f"no Arrow files in {source}")
    for f in files:
        if not f.is_file():
            raise UsageError(f"{source}: {f.name} is missing")
        head = _magic(f)
        if not (head.startswith(_ARROW_FILE_MAGIC) or head.startswith(_ARROW_STREAM_MAGIC)):
            raise UsageError(f"{f} is not an Arrow IPC file (a datasets save_to_disk folder holds those)")
    return files


def _binary(pa: Any, t: Any) -> bool:
    """A column of image bytes: binary, or a struct holding binary (the datasets Image feature)."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(_binary(pa, t.field(i).type) for i in range(t.num_fields))


class TableReader:
    """Records of Parquet or Arrow files, in file order then row order; positions are 1-based row numbers across
    all files."""

    def __init__(self, source: str, *, format: str, columns: Columns | None, base_dir: str | None) -> None:
        """``columns`` None: the table is only read as rows (``rows``: gold answers), not as records."""
        self.format = format
        self.source = source
        self._pa = pyarrow()
        self.files = parquet_files(source) if format == "parquet" else arrow_files(source)
        names = self._schema(self.files[0]).names
        self.columns = Columns()
        if columns is not None:
            self.columns = choose_columns(names, columns, where=str(self.files[0]))
            for f in self.files[1:]:
                choose_columns(self._schema(f).names, self.columns, where=str(f))  # every part has the columns
        self._base = Path(base_dir).expanduser().absolute() if base_dir is not None else None

    def _schema(self, path: Path) -> Any:
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return pq.read_schema(path)
            with self._open_ipc(path) as reader:
                return reader.schema
        except (OSError, self._pa.ArrowException) as e:
            raise UsageError(f"cannot read {path}: {e}") from None

    def _open_ipc(self, path: Path) -> Any:
        ipc = self._pa.ipc
        if _magic(path).startswith(_ARROW_FILE_MAGIC):
            return ipc.open_file(self._pa.OSFile(str(path)))
        return ipc.open_stream(self._pa.OSFile(str(path)))

    def _root(self, path: Path) -> Path:
        return self._base if self._base is not None else path.absolute().parent

    def _row_counts(self) -> list[int] | None:
        if self.format != "parquet":
            return None
        import pyarrow.parquet as pq

        return [pq.ParquetFile(f).metadata.num_rows for f in self.files]

    def count(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> int | None:
        counts = self._row_counts()
        if counts is None:
            return None
        return sum(selected(i, i + 1, shard, skip) for i in range(sum(counts)))

    def records(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> Iterator[Item]:
        index = 0  # rows before the current batch, over all files
        for path in self.files:
            root = self._root(path)
            for start, batch in self._batches(path, index, shard, skip):
                if isinstance(batch, _Unreadable):  # a corrupt stretch: each of its rows gets an error row
                    err = InvalidRecordError(f"{path.name}: cannot read this row ({batch.message})")
                    yield from (BadRecord(i + 1, i + 1, err) for i in range(start, start + batch.rows)
                                if selected(i, i + 1, shard, skip))
                    index = start + batch.rows
                    continue
                rows = range(start, start + batch.num_rows)
                wanted = [i for i in rows if selected(i, i + 1, shard, skip)]
                if wanted:
                    taken = batch.take(self._pa.array([i - start for i in wanted], self._pa.int64()))
                    for i, row in zip(wanted, taken.to_pylist(), strict=True):
                        yield row_record(row, position=i + 1, columns=self.columns, root=root)
                index = start + batch.num_rows

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, the row's cells as JSON values) of every row; binary cells (images) left out."""
        index = 0
        for path in self.files:
            for start, batch in self._batches(path, index, None, frozenset()):
                names = [f.name for f in batch.schema if not _binary(self._pa, f.type)]
                for i, row in enumerate(batch.select(names).to_pylist()):
                    yield start + i + 1, json_safe(row)
                index = start + batch.num_rows

    def _batches(
        self, path: Path, first: int, shard: tuple[int, int] | None, skip: frozenset[int]
    ) -> Iterator[tuple[int, Any]]:
        """(index of the batch's first row over all files, record batch or ``_Unreadable``) of one file."""
        failures = (OSError, self._pa.ArrowException)
        if self.format == "parquet":
            import pyarrow.parquet as pq

            # A buffered stream reads a column chunk page by page: a large row group is never read whole.
            pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
            start = first
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                end = start + n
                if any(selected(i, i + 1, shard, skip) for i in range(start, end)):
                    try:
                        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g]):
                            yield start, batch
                            start += batch.num_rows
                    except failures as e:  # the rest of this row group; the next one is read as usual
                        yield start, _Unreadable(end - start, str(e).splitlines()[0])
                start = end
            return
        start = first
        try:
            with self._open_ipc(path) as reader:
                for batch in reader:
                    for off in range(0, batch.num_rows, BATCH_ROWS):
                        part = batch.slice(off, BATCH_ROWS)
                        yield start, part
                        start += part.num_rows
        except failures as e:  # a stream has no row count: one error row where it broke, then the next file
            yield start, _Unreadable(1, str(e).splitlines()[0])


@dataclass(frozen=True)
class _Unreadable:
    """Rows pyarrow could not read (a corrupt page, a truncated stream)."""

    rows: int
    message: str
