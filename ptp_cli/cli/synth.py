"""``ptp synth``: write a synthetic high-resolution benchmark (images + questions.jsonl with gold answers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptp_cli.errors import UsageError

MAX_GRID_TILES = 12  # the largest grid a synth canvas is drawn for (InternVL2's default tile cap)


def synth_command(
    out: Annotated[Path, typer.Option(metavar="DIR", help="Folder for images/ and questions.jsonl (created if missing).")],
    n: Annotated[int, typer.Option(help="Number of questions (one image each).")] = 600,
    seed: Annotated[int, typer.Option(help="Benchmark seed: the same seed writes the same files.")] = 1000,
    min_tiles: Annotated[int, typer.Option(help="Fewest tiles a canvas tiles into (thumbnail not counted).")] = 1,
    max_tiles: Annotated[int, typer.Option(help=f"Most tiles a canvas tiles into (at most {MAX_GRID_TILES}).")] = 12,
) -> None:
    """Write N synthetic scenes, each with one question whose one-word answer lives in a small region."""
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    if not 1 <= min_tiles <= max_tiles <= MAX_GRID_TILES:
        raise UsageError(
            f"need 1 <= --min-tiles <= --max-tiles <= {MAX_GRID_TILES}, got {min_tiles} and {max_tiles}"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    from ptp_cli.synth import GRIDS, write_benchmark  # imports numpy and torch: keep `ptp --help` fast

    if not any(min_tiles <= cols * rows <= max_tiles for cols, rows in GRIDS):
        counts = sorted({cols * rows for cols, rows in GRIDS})
        raise UsageError(f"no synth canvas tiles into {min_tiles}..{max_tiles} tiles; tile counts drawn: {counts}")
    path = write_benchmark(out, n=n, seed=seed, min_tiles=min_tiles, max_tiles=max_tiles)
    typer.echo(f"ptp: wrote {n} questions to {path}", err=True)
