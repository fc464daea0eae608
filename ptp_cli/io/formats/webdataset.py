"""WebDataset shards: ``.tar`` files whose members are grouped into samples by key (``dir/key.jpg`` next to
``dir/key.json``), streamed with Python's ``tarfile``, one member in memory at a time.

A sample's image is its member with the ``--image-column`` extension (default: the first of jpg, jpeg, png,
webp, bmp, gif, tif, tiff, ppm); its question is the ``--question-column`` field of its ``.json`` member
(default ``question``, then ``prompt``), or its ``.txt`` member. The id is the JSON's ``id`` (``--id-column``)
or the sample's key. The JSON's other fields are echoed in the row. Positions count samples across the shards
in order. A truncated or corrupt shard ends that shard with one error row; the next shard is read as usual.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ptp_cli.errors import InvalidRecordError, UsageError
from ptp_cli.io.formats.base import Columns, Item, expand_braces, json_safe, selected
from ptp_cli.io.records import INPUT_FIELDS, BadRecord, Record, _overrides

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_MAX_TEXT = 1 << 20  # a .json/.txt member larger than this is not a question


def shard_files(source: str) -> list[Path]:
    """The shards of ``source``: one file, a brace pattern (``shard-{000..009}.tar``), or a folder of ``.tar``s;
    each checked to be a tar file, so a mislabelled file is a usage error before any model loads."""
    path = Path(source).expanduser()
    files = sorted(path.glob("*.tar")) if path.is_dir() else [Path(p).expanduser() for p in expand_braces(source)]
    if not files:
        raise UsageError(f"no .tar shards in {source}")
    for f in files:
        if not f.is_file():
            raise UsageError(f"cannot read input {f}: no such file")
        if not tarfile.is_tarfile(f):
            raise UsageError(f"{f} is not a tar file (WebDataset shards are tar archives)")
    return files


def _split(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {extension: bytes}, problem) per sample of one shard, in order. A truncated or corrupt shard ends
    with the sample being read when it broke, its problem saying so (or a keyless one when none had begun)."""
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:  # streamed: members are read in order, never seeked
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = _split(info.name)
                if k != key and key is not None:
                    yield key, members, None
                    members = {}
                key = k
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        yield key or f"{path.name}:end", members, f"{path.name} is truncated or corrupt here ({e}); the shard ends"
        return
    if key is not None:
        yield key, members, None


class ShardReader:
    """Records of WebDataset shards."""

    format = "webdataset"

    def __init__(self, source: str, *, columns: Columns) -> None:
        self.source = source
        self.files = shard_files(source)
        self.columns = columns

    def count(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> int | None:
        return None  # a tar has no index: counting would read every shard twice

    def records(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> Iterator[Item]:
        index = -1
        for path in self.files:
            for sample in _samples(path):
                index += 1
                if not selected(index, index + 1, shard, skip):
                    continue
                key, members, problem = sample
                if problem is not None:
                    yield BadRecord(index + 1, key, InvalidRecordError(problem))
                else:
                    yield self.record(key, members, position=index + 1)

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, the sample's JSON fields and its key) of every sample (gold answers)."""
        index = 0
        for path in self.files:
            for key, members, _ in _samples(path):
                index += 1
                try:
                    meta = orjson.loads(members["json"]) if "json" in members else {}
                except orjson.JSONDecodeError:
                    meta = {}
                yield index, {"key": key, **(meta if isinstance(meta, dict) else {})}

    def record(self, key: str, members: dict[str, bytes], *, position: int) -> Record | BadRecord:
        """One sample -> a Record, or a BadRecord naming what is missing or malformed."""
        problems: list[str] = []
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                loaded = orjson.loads(members["json"][:_MAX_TEXT])
                meta = loaded if isinstance(loaded, dict) else {}
                if not isinstance(loaded, dict):
                    problems.append(f"{key}.json is not a JSON object")
            except orjson.JSONDecodeError as e:
                problems.append(f"{key}.json is not valid JSON: {e}")
        rid: Any = meta.get(self.columns.id or "id")
        if not isinstance(rid, str | int | float | bool):
            rid = key
        question = self._question(key, members, meta, problems)
        image = self._image(key, members, problems)
        names = {self.columns.question or "question", "prompt", self.columns.id or "id"}
        overrides = _overrides({k: v for k, v in meta.items() if k in INPUT_FIELDS and k not in names}, problems)
        if problems:
            return BadRecord(position, rid, InvalidRecordError("; ".join(problems)))
        assert question is not None and image is not None
        extra = {"key": key, **{k: json_safe(v) for k, v in meta.items() if k not in names and k not in INPUT_FIELDS}}
        return Record(line=position, id=rid, image=image, question=question, overrides=overrides, extra=extra)

    def _question(self, key: str, members: dict[str, bytes], meta: dict[str, Any], problems: list[str]) -> str | None:
        field = self.columns.question
        if field == "txt" or (field is None and "json" not in members and "txt" in members):
            text: Any = members.get("txt", b"").decode("utf-8", errors="replace")
        else:
            names = (field,) if field is not None else ("question", "prompt")
            text = next((meta[n] for n in names if meta.get(n) is not None), None)
            if text is None and field is None and "txt" in members:
                text = members["txt"].decode("utf-8", errors="replace")
        if not isinstance(text, str) or not text.strip():
            where = f"field {field!r} of {key}.json" if field not in (None, "txt") else f"{key}.json or {key}.txt"
            problems.append(f"no question in {where}")
            return None
        return text.strip()

    def _image(self, key: str, members: dict[str, bytes], problems: list[str]) -> bytes | None:
        exts = (self.columns.image.lower().lstrip("."),) if self.columns.image else IMAGE_EXTENSIONS
        found = [e for e in exts if e in members]
        if not found:
            problems.append(f"sample {key} has no image member ({', '.join('.' + e for e in exts)})")
            return None
        if len(found) > 1 and self.columns.image is None:
            problems.append(f"sample {key} holds {len(found)} images; ptp answers one image per question")
            return None
        data = members[found[0]]
        if not data:
            problems.append(f"{key}.{found[0]} is empty (0 bytes)")
            return None
        return data
