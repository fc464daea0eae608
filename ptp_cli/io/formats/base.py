"""What every input reader and output writer shares: the column names, the record positions, JSON-safe values.

A reader turns a source into the same ``Record``/``BadRecord`` items ``records.iter_records`` yields for JSONL.
Each item carries a *position* in ``line``: a 1-based number that is stable for a given input (a JSONL or
batch file's physical line, a Parquet/Arrow row number across its files in order, a WebDataset sample number
across its shards in order). ``--shard i/n`` keeps the items whose 0-based index among all items is ``i``
modulo ``n``, and ``--resume`` skips the positions an earlier run's output already holds, for every format
alike.

A writer takes rows (the dicts ``Pipeline.run`` yields) in order, through ``output.OrderedWriter``.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ptp_cli.io.records import BadRecord, Record
from ptp_cli.settings import INPUT_FORMATS, OUTPUT_FORMATS

__all__ = ["INPUT_FORMATS", "OUTPUT_FORMATS", "Columns", "Item", "Reader", "data_url_bytes", "expand_braces",
           "json_safe", "selected"]


Item = Record | BadRecord


@dataclass(frozen=True, slots=True)
class Columns:
    """Where a table's fields are (None: guess). For WebDataset: the image member's extension and the JSON field
    (or ``txt``) holding the question."""

    image: str | None = None
    question: str | None = None
    id: str | None = None


class Reader(Protocol):
    """An opened input: checked at open (a usage error there, before any model loads), read lazily."""

    format: str  # one of INPUT_FORMATS
    source: str  # what the user named

    def records(
        self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()
    ) -> Iterator[Item]: ...

    def count(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> int | None:
        """How many items ``records`` would yield, when that is cheap to know (else None)."""
        ...


def selected(index: int, position: int, shard: tuple[int, int] | None, skip: frozenset[int]) -> bool:
    """Whether the item at 0-based ``index`` (1-based ``position``) belongs to this run."""
    return (shard is None or index % shard[1] == shard[0]) and position not in skip


def json_safe(value: Any) -> Any:
    """A table cell as a value orjson writes (rows echo the input's columns): bytes as a short note (image
    bytes are never copied into rows), dates as ISO text, decimals as text, containers recursively."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dt.date | dt.time | dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


def data_url_bytes(url: str) -> bytes:
    """The payload of a ``data:[type];base64,...`` URL; ValueError when it is not one."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise ValueError("a data URL needs a comma after its media type")
    if not head.endswith(";base64"):
        raise ValueError("only base64 data URLs are supported")
    return base64.b64decode(payload, validate=True)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``shard-{000..009}.tar`` -> ten names (zero padding kept); ``{a,b}`` lists too; nested braces not."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m[1]
    if (rng := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        lo, hi = rng[1], rng[2]
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [name for c in choices for name in expand_braces(head + c + tail)]
