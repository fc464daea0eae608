"""Draw what pruning kept: a record's image as the model saw it, every visual token a cell, dropped ones dimmed.

The tiling is recomputed from the image and the row's settings (``max_tiles``, ``min_tiles``, the record's
own overrides), so no model is needed; the row's tile count must agree. Layout, in pixels:

- each 448-px tile is drawn at full size; its 16 x 16 tokens are its 28 x 28 px cells (token i = 16*row + col,
  tile t's token i is kept index 256*t + i);
- tiles stand on their grid (``TILE_GAP`` apart), the thumbnail to the right of the grid (``THUMB_GAP``
  further), everything inside a ``MARGIN``; above each row of tiles, a ``LABEL_H`` strip names each tile's
  budget (tokens kept of 256);
- below, a caption: the record's id and method, then the question and the answer, wrapped.

Kept cells are the tile's own pixels; dropped cells are blended towards ``DIM_COLOUR`` (``DIM_KEEP`` of the
pixel stays). A row of two-stage pruning (``--vit-prune``, its ``vit_kept``) tells the stages apart: cells the ViT
dropped are dimmed as above, cells that survived the ViT but not the final choice are tinted ``STAGE2_COLOUR``
(``STAGE2_KEEP`` of the pixel stays), and each label gives both counts.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ptp_cli.errors import UsageError
from ptp_cli.io.records import Record
from ptp_cli.preprocess.image import TilingOptions, dynamic_tiles, find_grid, load_image

TILE = 448  # tile side (InternVL2's ViT input)
SIDE = 16  # tokens per tile side after pixel shuffle: 256 per tile
CELL = TILE // SIDE  # 28 px per token
MARGIN = 16
TILE_GAP = 6
THUMB_GAP = 30
LABEL_H = 26
CAPTION_LINE_H = 24
DIM_KEEP = 0.25
DIM_COLOUR = (24, 24, 24)
STAGE2_KEEP = 0.45
STAGE2_COLOUR = (30, 80, 200)
_FONT_SIZE = 18


@dataclass(frozen=True)
class Layout:
    """Where each tile goes on the canvas."""

    cols: int  # tile grid columns
    rows: int  # tile grid rows
    thumbnail: bool  # a thumbnail tile follows the grid

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows + self.thumbnail

    @property
    def grid_size(self) -> tuple[int, int]:
        """Width and height of everything but the caption."""
        width = 2 * MARGIN + self.cols * TILE + (self.cols - 1) * TILE_GAP + (THUMB_GAP + TILE) * self.thumbnail
        height = 2 * MARGIN + self.rows * (LABEL_H + TILE) + (self.rows - 1) * TILE_GAP
        return width, height

    def origin(self, t: int) -> tuple[int, int]:
        """Top-left corner of tile t's pixels (the thumbnail is tile cols*rows)."""
        if t == self.cols * self.rows:
            return MARGIN + self.cols * (TILE + TILE_GAP) - TILE_GAP + THUMB_GAP, MARGIN + LABEL_H
        r, c = divmod(t, self.cols)
        return MARGIN + c * (TILE + TILE_GAP), MARGIN + r * (LABEL_H + TILE + TILE_GAP) + LABEL_H


def tiling_for(row: Mapping[str, Any], overrides: Mapping[str, Any]) -> TilingOptions:
    """The tiling the row ran with: its settings, then the record's own max_tiles/min_tiles."""
    settings = row.get("settings") or {}
    max_tiles = overrides.get("max_tiles") or settings.get("max_tiles") or 12
    min_tiles = overrides.get("min_tiles") or settings.get("min_tiles") or 1
    return TilingOptions(min_tiles=int(min_tiles), max_tiles=int(max_tiles))


def layout_for(image: Image.Image, tiling: TilingOptions, *, tiles: int | None) -> Layout:
    """The grid of ``image``; ``tiles`` (the row's count) decides the thumbnail and must agree with the grid."""
    cols, rows = find_grid(*image.size, min_tiles=tiling.min_tiles, max_tiles=tiling.max_tiles, image_size=TILE)
    layout = Layout(cols, rows, thumbnail=cols * rows > 1 and tiling.use_thumbnail)
    if tiles is not None and tiles != layout.num_tiles:
        if cols * rows > 1 and tiles == cols * rows:
            return Layout(cols, rows, thumbnail=False)  # a checkpoint without thumbnails
        raise ValueError(f"the image tiles into {layout.num_tiles} tiles with max_tiles {tiling.max_tiles}, "
                         f"min_tiles {tiling.min_tiles}, but the row says {tiles}")
    return layout


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _caption(lines: Sequence[str], width: int) -> list[str]:
    chars = max(20, (width - 2 * MARGIN) // (_FONT_SIZE * 55 // 100))  # ~0.55 em per character
    out = []
    for line in lines:
        out += textwrap.wrap(line, chars, max_lines=6, placeholder=" …") or [""]
    return out


def render(
    image: Image.Image,
    kept: Sequence[int],
    *,
    tiling: TilingOptions,
    tiles: int | None = None,
    title: str = "",
    question: str = "",
    answer: str = "",
    vit_kept: Sequence[int] | None = None,
) -> Image.Image:
    """The picture of one record: tiles in place, kept tokens clear, dropped ones dimmed, a caption below.
    ``vit_kept``: the tokens the ViT kept (stage 1 of ``--vit-prune``); those dropped after it are tinted."""
    layout = layout_for(image, tiling, tiles=tiles)
    per_tile = SIDE * SIDE
    n_visual = layout.num_tiles * per_tile
    keep, survived = _mask(kept, n_visual, "kept"), _mask(vit_kept, n_visual, "vit_kept")
    if vit_kept is not None and (keep & ~survived).any():
        raise ValueError("kept indices must be a subset of vit_kept (the final choice is among the ViT's survivors)")
    width, grid_h = layout.grid_size
    legend = ["dark: dropped inside the ViT; blue: dropped before the LLM"] if vit_kept is not None else []
    caption = _caption([title, *legend, f"Q: {question}", f"A: {answer}"], width)
    canvas = Image.new("RGB", (width, grid_h + len(caption) * CAPTION_LINE_H + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(_FONT_SIZE)
    sources = dynamic_tiles(image, min_tiles=tiling.min_tiles, max_tiles=tiling.max_tiles, image_size=TILE,
                            use_thumbnail=layout.thumbnail)
    dim, tint = np.asarray(DIM_COLOUR, dtype=np.float32), np.asarray(STAGE2_COLOUR, dtype=np.float32)
    for t, tile in enumerate(sources):
        pixels = np.asarray(tile, dtype=np.float32)  # [448, 448, 3]
        mask = keep[t * per_tile:(t + 1) * per_tile].reshape(SIDE, SIDE)
        alive = survived[t * per_tile:(t + 1) * per_tile].reshape(SIDE, SIDE)
        cells = np.kron(~alive, np.ones((CELL, CELL), dtype=bool))[..., None]  # [448, 448, 1]: dropped in the ViT
        later = np.kron(alive & ~mask, np.ones((CELL, CELL), dtype=bool))[..., None]  # dropped after the ViT
        shown = np.where(cells, DIM_KEEP * pixels + (1 - DIM_KEEP) * dim, pixels)
        shown = np.where(later, STAGE2_KEEP * pixels + (1 - STAGE2_KEEP) * tint, shown)
        x, y = layout.origin(t)
        canvas.paste(Image.fromarray(np.rint(shown).astype(np.uint8)), (x, y))
        name = "thumbnail" if layout.thumbnail and t == layout.num_tiles - 1 else f"tile {t + 1}"
        stage1 = f" (ViT kept {int(alive.sum())})" if vit_kept is not None else ""
        draw.text((x, y - LABEL_H // 2), f"{name}: {int(mask.sum())}/{per_tile} kept{stage1}", fill="black",
                  font=font, anchor="lm")
    for i, line in enumerate(caption):
        draw.text((MARGIN, grid_h + i * CAPTION_LINE_H), line, fill="black", font=font)
    return canvas


def _mask(indices: Sequence[int] | None, n_visual: int, name: str) -> np.ndarray:
    """[n_visual] True at ``indices`` (None: every token)."""
    if indices is None:
        return np.ones(n_visual, dtype=bool)
    out = np.zeros(n_visual, dtype=bool)
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_visual):
        raise ValueError(f"{name} indices must be in [0, {n_visual}) for {n_visual // (SIDE * SIDE)} tiles")
    out[idx] = True
    return out


def kept_of(row: Mapping[str, Any]) -> list[int]:
    """The row's kept indices; UsageError when it has none (an error row, or ptp infer ran without --kept)."""
    if row.get("error") is not None:
        err = row["error"]
        raise UsageError(f"line {row.get('line')} (id {row.get('id')!r}) is an error row "
                         f"({err.get('type') if isinstance(err, dict) else err}): nothing was kept")
    kept = row.get("kept")
    if not isinstance(kept, list):
        raise UsageError(f"line {row.get('line')} (id {row.get('id')!r}) has no kept indices: "
                         "run ptp infer with --kept")
    return [int(k) for k in kept]


def title_of(row: Mapping[str, Any], kept: Sequence[int]) -> str:
    settings = row.get("settings") or {}
    method = settings.get("method") or row.get("method") or "?"
    ratio = f" ratio {settings['ratio']:g}" if isinstance(settings.get("ratio"), int | float) else ""
    if isinstance(settings.get("vit_prune"), int | float):
        ratio += f", ViT {settings['vit_prune']:g}"
    total = (row.get("tokens") or {}).get("visual_before")
    of = f" of {total}" if total else ""
    return f"{row.get('id')} | {method}{ratio} | {len(kept)}{of} visual tokens kept"


def render_row(row: Mapping[str, Any], record: Record) -> Image.Image:
    """The picture of a result row, with its input record (image, question, tiling overrides)."""
    kept = kept_of(row)
    tiling = tiling_for(row, record.overrides)
    image = load_image(record.image)
    tiles = (row.get("tokens") or {}).get("tiles")
    vit_kept = row.get("vit_kept")
    return render(image, kept, tiling=tiling, tiles=tiles if isinstance(tiles, int) else None,
                  title=title_of(row, kept), question=record.question, answer=str(row.get("answer", "")),
                  vit_kept=[int(k) for k in vit_kept] if isinstance(vit_kept, list) else None)
