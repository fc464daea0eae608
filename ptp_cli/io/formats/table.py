"""Records from table rows (Parquet, Arrow): column choice, image cells, one row -> ``Record``/``BadRecord``.

Shared by the Parquet and Arrow readers (and by the Ray path), and free of pyarrow: a row arrives as the dict
``pyarrow.RecordBatch.to_pylist`` makes of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ptp_cli.errors import InvalidRecordError, UsageError
from ptp_cli.io.formats.base import Columns, json_safe
from ptp_cli.io.records import INPUT_FIELDS, BadRecord, Record, _overrides

# Guesses, in order, when a column is not named by a flag.
IMAGE_GUESSES = ("image", "img", "image_bytes", "image_path")
QUESTION_GUESSES = ("question", "prompt", "query", "instruction")
ID_GUESSES = ("id", "question_id", "qid")


def choose_columns(names: Sequence[str], given: Columns, *, where: str) -> Columns:
    """The image, question and id columns of a table with these column ``names``; a column that is neither
    given nor guessed is a ``UsageError`` listing the table's columns (the id may be absent: row numbers)."""
    listed = ", ".join(names) if len(names) <= 30 else ", ".join(names[:30]) + ", ..."

    def pick(value: str | None, guesses: tuple[str, ...], flag: str, *, required: bool) -> str | None:
        if value is not None:
            if value not in names:
                raise UsageError(f"{where}: no column {value!r} ({flag}); its columns: {listed}")
            return value
        found = next((g for g in guesses if g in names), None)
        if found is None and required:
            raise UsageError(f"{where}: no {flag.removeprefix('--').removesuffix('-column')} column among "
                             f"{', '.join(guesses)}; name it with {flag} (its columns: {listed})")
        return found

    return Columns(
        image=pick(given.image, IMAGE_GUESSES, "--image-column", required=True),
        question=pick(given.question, QUESTION_GUESSES, "--question-column", required=True),
        id=pick(given.id, ID_GUESSES, "--id-column", required=given.id is not None),
    )


def image_of(cell: Any, root: Path) -> Path | bytes | str:
    """An image cell as the file's bytes or a path; a ``str`` return is the problem with the cell.

    Accepted: bytes; a path string (relative to ``root``); the Hugging Face ``Image`` struct ``{bytes, path}``
    (bytes win; a path alone is read from disk); a one-element list of any of these.
    """
    if isinstance(cell, list):
        if len(cell) != 1:
            return f"the image cell holds {len(cell)} images; ptp answers one image per question"
        cell = cell[0]
    if isinstance(cell, Mapping):
        data, path = cell.get("bytes"), cell.get("path")
        if data:
            return bytes(data)
        cell = path
    if isinstance(cell, bytes | bytearray):
        return bytes(cell) if cell else "the image cell is empty (0 bytes)"
    if isinstance(cell, str) and cell.strip():
        if "://" in cell or cell.startswith("data:"):
            return "image must be bytes or a local path; URLs are not supported"
        return root / Path(cell).expanduser()
    if cell is None or cell == "":
        return "the image cell is empty"
    return f"the image cell holds a {type(cell).__name__}, not bytes, a path or an Image struct"


def row_record(row: Mapping[str, Any], *, position: int, columns: Columns, root: Path) -> Record | BadRecord:
    """One table row -> a Record, or a BadRecord naming everything wrong with it. Every other column is echoed
    in the row (image bytes as a short note); override columns (max_new_tokens, ...) apply as in JSONL."""
    problems: list[str] = []
    rid: Any = position
    if columns.id is not None and row.get(columns.id) is not None:
        rid = row[columns.id]
        if not isinstance(rid, str | int | float | bool):
            problems.append(f"id column {columns.id!r} holds a {type(rid).__name__}, not a string or a number")
            rid = position
    assert columns.question is not None and columns.image is not None
    question = row.get(columns.question)
    if not isinstance(question, str) or not question.strip():
        what = "missing" if question is None else "empty" if isinstance(question, str) else f"a {type(question).__name__}"
        problems.append(f"question column {columns.question!r} is {what}")
    image = image_of(row.get(columns.image), root)
    if isinstance(image, str):
        problems.append(image)
    used = {columns.image, columns.question, columns.id}
    overrides = _overrides({k: v for k, v in row.items() if k in INPUT_FIELDS and k not in used}, problems)
    if problems:
        return BadRecord(position, rid, InvalidRecordError("; ".join(problems)))
    assert isinstance(question, str) and not isinstance(image, str)
    extra = {k: json_safe(v) for k, v in row.items() if k not in used and k not in INPUT_FIELDS}
    cell = row.get(columns.image)
    relative = isinstance(image, Path) and isinstance(cell, str) and not Path(cell).expanduser().is_absolute()
    return Record(line=position, id=rid, image=image, question=question.strip(), overrides=overrides,
                  extra=extra, image_relative=relative)
