"""``ptp show``: draw the visual tokens a ``ptp infer --kept`` row kept over its image, as a PNG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ptp_cli.cli.console import EXIT_OK, EXIT_RECORDS_FAILED
from ptp_cli.errors import PtpError, UsageError


def _file_name(row: dict, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(row.get("id")))[:80].strip("._") or "record"
    name = f"{stem}.png" if f"{stem}.png" not in taken else f"{stem}-line{row.get('line')}.png"
    taken.add(name)
    return name


def _from_rows(rows: list[dict]) -> list[tuple[Any, dict]]:
    """(record, row) pairs rebuilt from what ``--kept`` rows carry (``row["record"]``); error rows have none."""
    from ptp_cli.io.records import Record

    pairs = []
    for row in rows:
        shown = row.get("record")
        if row.get("error") is not None:
            continue
        where = f"line {row.get('line')} (id {row.get('id')!r})"
        if row.get("kept") is None:
            raise UsageError(f"{where} has no kept indices: rerun ptp infer with --kept (ptp show draws what "
                             "those rows say was kept)")
        if not isinstance(shown, dict) or not shown.get("image"):
            raise UsageError(f"{where} carries no image path (its image was given as bytes): give --input FILE, "
                             "the input ptp infer read")
        overrides = {k: shown[k] for k in ("max_tiles", "min_tiles") if k in shown}
        pairs.append((Record(line=row["line"], id=row.get("id"), image=Path(shown["image"]),
                             question=str(shown.get("question", "")), overrides=overrides), row))
    return pairs


def _select(predictions: Path, input: Path | None, *, id: str | None, line: int | None) -> list[tuple[Any, dict]]:
    """(input record, row) pairs, filtered by id and line: the records of ``input`` matched to the rows, or,
    without ``input``, the records the rows carry."""
    from ptp_cli.eval.score import match_rows, read_predictions
    from ptp_cli.io.formats import open_input

    rows = read_predictions(predictions)
    if input is None:
        pairs = _from_rows(rows)
    else:
        records = list(open_input(str(input)).records())
        matched, _ = match_rows(records, rows)
        pairs = [(rec, row) for rec, row in zip(records, matched, strict=True) if row is not None]
    source = f"a record of {input}" if input is not None else "a drawable row"
    if id is not None or line is not None:
        pairs = [(rec, row) for rec, row in pairs
                 if (id is None or str(row.get("id")) == id) and (line is None or row.get("line") == line)]
        wanted = " and ".join(w for w in (f"id {id!r}" if id is not None else "",
                                          f"line {line}" if line is not None else "") if w)
        if not pairs:
            raise UsageError(f"{predictions} has no row with {wanted} matching {source}")
    if not pairs:
        raise UsageError(f"no row of {predictions} matches {source}")
    return pairs


def _draw_one(rec: Any, row: dict, output: Path) -> None:
    from ptp_cli.io.records import Record
    from ptp_cli.io.show import render_row  # imports torch (the tiling): the checks before stay fast

    if not isinstance(rec, Record):
        raise UsageError(f"input line {rec.line} is not a usable record: {rec.error}")
    try:
        render_row(row, rec).save(output, format="PNG", optimize=True)
    except ValueError as e:
        raise UsageError(f"line {rec.line}: {e}") from None


def _draw_all(pairs: list[tuple[Any, dict]], out_dir: Path) -> int:
    """Every pair's picture into ``out_dir``; the exit code (3 when some could not be drawn)."""
    from ptp_cli.io.records import Record
    from ptp_cli.io.show import render_row

    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    written, failed = 0, 0
    for rec, row in pairs:
        if row.get("error") is not None or not isinstance(rec, Record):
            continue  # nothing was kept for a failed record
        try:
            render_row(row, rec).save(out_dir / _file_name(row, taken), format="PNG", optimize=True)
            written += 1
        except UsageError:
            raise  # no kept indices: the same for every row
        except (PtpError, ValueError) as e:
            failed += 1
            typer.echo(f"ptp: warning: line {rec.line} (id {rec.id!r}): {e}", err=True)
    skipped = len(pairs) - written - failed
    typer.echo(f"ptp: wrote {written} pictures to {out_dir}" + (f", {failed} failed" if failed else "")
               + (f", {skipped} error rows skipped" if skipped else ""), err=True)
    return EXIT_RECORDS_FAILED if failed else EXIT_OK


def show_command(
    predictions: Annotated[Path, typer.Argument(metavar="PRED", help="Output of ptp infer --kept.")],
    input: Annotated[Path | None, typer.Option(
        "--input", "-i", metavar="FILE", help="The input ptp infer read (JSONL, Parquet, a datasets folder, "
        "WebDataset shards or a batch file). [default: the image paths and questions the --kept rows carry]")] = None,
    id: Annotated[str | None, typer.Option("--id", metavar="ID", help="Draw the record with this id.")] = None,
    line: Annotated[int | None, typer.Option(help="Draw the record of this input line.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write the PNG here.")] = None,
    out_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Write every (selected) record's PNG into this folder.")] = None,
) -> None:
    """Draw which visual tokens a ptp infer --kept row kept, over its image (no model is needed).

    The image as the model saw it: its tiles and thumbnail, every visual token a 28 px cell, kept tokens clear
    and dropped ones dimmed, each tile labelled with its budget, the question and answer below. A --vit-prune row
    shows both stages: dark, dropped inside the ViT; blue, dropped after it.
    """
    if (output is None) == (out_dir is None):
        raise UsageError("give -o FILE.png (one record) or --out-dir DIR (every record)")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file")
    pairs = _select(predictions, input, id=id, line=line)
    if out_dir is not None:
        raise typer.Exit(_draw_all(pairs, out_dir))
    assert output is not None
    if len(pairs) > 1:
        lines = ", ".join(str(row.get("line")) for _, row in pairs[:5])
        raise UsageError(f"{len(pairs)} rows match (lines {lines}); choose one with --id or --line")
    _draw_one(*pairs[0], output)
    typer.echo(f"ptp: wrote {output}", err=True)
