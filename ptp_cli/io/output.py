"""Writing result rows: rows that finish out of order go out in input order, one orjson line each (or through
another format's ``RowSink``: ``ptp_cli.io.formats``)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import IO, Any, Protocol

import orjson

from ptp_cli.errors import RecordError
from ptp_cli.io.records import error_row


class RowSink(Protocol):
    """Where an ``OrderedWriter`` puts rows: ``encode`` runs at ``put`` (a row that cannot be written fails
    there, and the buffer holds the compact form); ``write`` gets encoded rows in order; ``flush`` and ``close``
    make them durable. The JSONL sink below writes each burst at once; others may batch (Parquet parts)."""

    def encode(self, row: Mapping[str, Any]) -> Any: ...

    def write(self, rows: list[Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One orjson line per row, flushed after every burst."""

    def __init__(self, stream: IO[bytes] | IO[str], *, convert: Any = None) -> None:
        if isinstance(stream, io.TextIOBase):
            stream.flush()  # anything already written as text goes before our bytes
            stream = stream.buffer  # type: ignore[attr-defined]
        self._stream: IO[bytes] = stream  # type: ignore[assignment]
        self._convert = convert  # row -> row in another JSON layout (the OpenAI batch output), or None

    def encode(self, row: Mapping[str, Any]) -> bytes:
        return _dumps(row if self._convert is None else self._convert(row))

    def write(self, rows: list[bytes]) -> None:
        self._stream.write(b"".join(rows))
        self._stream.flush()

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class OrderedWriter:
    """Write result rows in sequence order (0, 1, 2, ...) although they are ``put`` in any order.

    ``seq`` is the order in which the records were read in this run (``BadRecord``s included). A row waits in
    the buffer until every row before it has arrived; then the contiguous run is written in one ``write``
    and flushed, so ``tail -f`` sees rows promptly and a SIGKILL loses at most a torn last line, which
    ``scan_output`` repairs.

    Memory is bounded: ``put(seq)`` requires ``can_accept(seq)``, i.e. ``seq < next_seq + window``; a producer
    that gets ``False`` must finish its in-flight records (all of which have smaller seqs) before reading more.

    ``stream`` is a binary stream (a text stream is written through its ``.buffer``), or a ``RowSink``; the
    writer never closes a stream, and closes a sink. A closed pipe (``ptp infer ... | head``) raises ``BrokenPipeError`` from ``put``/``close``, so the CLI
    can exit quietly; the writer then refuses further rows.
    """

    def __init__(self, stream: IO[bytes] | IO[str] | RowSink, *, window: int = 1024) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._sink: RowSink = stream if hasattr(stream, "encode") else JsonlSink(stream)  # type: ignore[arg-type]
        self.window = window
        self._next = 0
        self._buffer: dict[int, Any] = {}
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
        self._buffer[seq] = self._sink.encode(row)  # serialise now: smaller, and a bad row fails here
        if seq == self._next:
            self._drain()

    def _drain(self) -> None:
        chunks = []
        while self._next in self._buffer:
            chunks.append(self._buffer.pop(self._next))
            self._next += 1
        if chunks:
            self._write(chunks)
            self._written += len(chunks)

    def _write(self, rows: list[Any]) -> None:
        try:
            self._sink.write(rows)
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
            self._sink.close()
            return
        seqs = sorted(self._buffer)
        missing = sorted(set(range(self._next, seqs[-1])) - set(seqs))
        self._write([self._buffer.pop(s) for s in seqs])
        self._sink.close()
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
