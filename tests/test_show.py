"""``ptp show``: the picture's geometry follows the tile grid, exactly the dropped tokens are dimmed, and the
command works on a real ``ptp infer --kept`` output (no model needed to draw)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptp_cli.io.show import LABEL_H, MARGIN, THUMB_GAP, TILE, TILE_GAP, render
from ptp_cli.preprocess.image import TilingOptions, dynamic_tiles

CELL_PX = 28  # a token of a 448-px tile: 2 x 2 ViT patches of 14 px
SHORT = {"title": "t", "question": "q", "answer": "a"}  # a caption of three short lines, whatever the width


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def tile_origins(cols: int, rows: int, thumbnail: bool) -> list[tuple[int, int]]:
    """Where the README's layout puts each tile: row-major grid, then the thumbnail right of the first row."""
    origins = [(MARGIN + c * (TILE + TILE_GAP), MARGIN + LABEL_H + r * (LABEL_H + TILE + TILE_GAP))
               for r in range(rows) for c in range(cols)]
    if thumbnail:
        origins.append((MARGIN + cols * TILE + (cols - 1) * TILE_GAP + THUMB_GAP, MARGIN + LABEL_H))
    return origins


def clear_cells(picture: Image.Image, image: Image.Image, *, max_tiles: int, cols: int, rows: int) -> set[int]:
    """Kept indices read back from the picture: cells whose pixels are the tile's own."""
    canvas = np.asarray(picture.convert("RGB"))
    tiles = dynamic_tiles(image, max_tiles=max_tiles)
    clear = set()
    for t, ((x, y), tile) in enumerate(zip(tile_origins(cols, rows, len(tiles) > 1), tiles, strict=True)):
        drawn, source = canvas[y:y + TILE, x:x + TILE], np.asarray(tile)
        for i in range(256):
            r, c = divmod(i, 16)
            cell = np.s_[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX]
            if np.array_equal(drawn[cell], source[cell]):
                clear.add(256 * t + i)
    return clear


@pytest.mark.parametrize(("size", "cols", "rows"), [((448, 448), 1, 1), ((896, 448), 2, 1), ((448, 1344), 1, 3),
                                                    ((1344, 896), 3, 2)])
def test_png_size_follows_the_tile_grid(size: tuple[int, int], cols: int, rows: int) -> None:
    tiling = TilingOptions(max_tiles=6)
    thumb = cols * rows > 1
    one = render(noise(448, 448), [], tiling=tiling, **SHORT)  # 1 x 1, no thumbnail
    pic = render(noise(*size), [], tiling=tiling, **SHORT)
    assert pic.width == 2 * MARGIN + cols * TILE + (cols - 1) * TILE_GAP + thumb * (THUMB_GAP + TILE)
    assert pic.height - one.height == (rows - 1) * (LABEL_H + TILE + TILE_GAP)


@pytest.mark.parametrize("kept_count", [0, 1, 300, 767, 768])
def test_exactly_the_dropped_tokens_are_dimmed(kept_count: int) -> None:
    image = noise(896, 448, seed=kept_count)  # 2 x 1 tiles + thumbnail = 768 tokens
    kept = sorted(np.random.default_rng(1).choice(768, size=kept_count, replace=False).tolist())
    pic = render(image, kept, tiling=TilingOptions(max_tiles=2), tiles=3, **SHORT)
    clear = clear_cells(pic, image, max_tiles=2, cols=2, rows=1)
    assert clear == set(kept)
    assert 1 - len(clear) / 768 == pytest.approx(1 - kept_count / 768)  # the fraction of dimmed cells


def test_a_different_kept_set_gives_a_different_picture() -> None:
    image, tiling = noise(896, 448), TilingOptions(max_tiles=2)
    a = np.asarray(render(image, list(range(0, 768, 2)), tiling=tiling, **SHORT))
    b = np.asarray(render(image, list(range(1, 768, 2)), tiling=tiling, **SHORT))
    a2 = np.asarray(render(image, list(range(0, 768, 2)), tiling=tiling, **SHORT))
    assert a.shape == b.shape and not np.array_equal(a, b) and np.array_equal(a, a2)


def test_kept_indices_and_tile_counts_are_checked() -> None:
    with pytest.raises(ValueError, match=r"kept indices must be in \[0, 768\)"):
        render(noise(896, 448), [768], tiling=TilingOptions(max_tiles=2))
    with pytest.raises(ValueError, match=r"tiles into 3 tiles .* but the row says 5"):
        render(noise(896, 448), [], tiling=TilingOptions(max_tiles=2), tiles=5)


# ---------------------------------------------------------------------------------------------------------
# The command


def ptp(*args: str | Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")} | ({"PTP_HOME": str(home)} if home else {})
    return subprocess.run([sys.executable, "-m", "ptp_cli.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def test_show_draws_what_ptp_infer_kept(tmp_path: Path, ptp_home: Path) -> None:
    noise(896, 448, seed=5).save(tmp_path / "wide.png")
    noise(300, 300, seed=6).save(tmp_path / "small.png")
    records = [{"id": "wide", "image": "wide.png", "question": "What is it?", "max_tiles": 2},
               {"id": "small", "image": "small.png", "question": "And this?"},
               {"id": "gone", "image": "missing.png", "question": "?"}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    pred, plain = tmp_path / "pred.jsonl", tmp_path / "plain.jsonl"
    proc = ptp("infer", questions, "--model", "tiny", "--kept", "--max-tiles", "6", "--max-new-tokens", "2",
               "--ratio", "0.75", "-o", pred, "-q", home=ptp_home)
    assert proc.returncode == 3, proc.stderr  # the missing image
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("kept", "record")}) + "\n"
                             for r in rows))
    row = rows[0]
    assert row["tokens"]["tiles"] == 3

    png = tmp_path / "wide.png.out.png"
    proc = ptp("show", pred, "--input", questions, "--id", "wide", "-o", png)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as pic, Image.open(tmp_path / "wide.png") as image:
        clear = clear_cells(pic, image.convert("RGB"), max_tiles=2, cols=2, rows=1)
        assert pic.width == 2 * MARGIN + 3 * TILE + TILE_GAP + THUMB_GAP
    assert clear == set(row["kept"])
    assert 1 - len(clear) / 768 == pytest.approx(1 - row["tokens"]["visual_after"] / row["tokens"]["visual_before"])
    # --kept rows carry their image, question and tiling override: the same picture without --input.
    assert row["record"] == {"image": str(tmp_path / "wide.png"), "question": "What is it?", "max_tiles": 2}
    alone = tmp_path / "alone.png"
    proc = ptp("show", pred, "--id", "wide", "-o", alone)
    assert proc.returncode == 0, proc.stderr
    assert alone.read_bytes() == png.read_bytes()

    folder = tmp_path / "all"
    proc = ptp("show", pred, "--input", questions, "--out-dir", folder)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["small.png", "wide.png"]  # the error row is skipped
    assert "1 error rows skipped" in proc.stderr

    for args, message in (
        ((plain, "--input", questions, "--id", "wide", "-o", png), "has no kept indices: run ptp infer with --kept"),
        ((plain, "--id", "wide", "-o", png), "has no kept indices: rerun ptp infer with --kept"),
        ((pred, "--input", questions, "--id", "nope", "-o", png), "has no row with id 'nope'"),
        ((pred, "--input", questions, "-o", png), "3 rows match (lines 1, 2, 3); choose one with --id or --line"),
    ):
        proc = ptp("show", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
