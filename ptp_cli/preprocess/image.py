"""Image loading and InternVL2 dynamic tiling, as pure functions.

``load_image`` turns a file into an 8-bit RGB ``PIL.Image`` or raises ``ImageError``; ``preprocess`` turns
that image into the normalised tile tensor the vision tower eats. The tiling reproduces the official
InternVL2 ``dynamic_preprocess`` (grid choice, bicubic resize, row-major crops, thumbnail last).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ptp_cli.errors import ImageError, RecordError

if TYPE_CHECKING:
    import torch

    from ptp_cli.config import ModelConfig

# Pillow's own default MAX_IMAGE_PIXELS (it warns above this and refuses above twice this).
DEFAULT_MAX_PIXELS = 178_956_970 // 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Read an image file (a path, or the file's bytes) fully into 8-bit RGB, upright by its EXIF orientation.

    Transparent pixels are composited on white; 16-bit samples are scaled (not clipped) to 8 bits.
    Images with more than ``max_pixels`` pixels are refused from the header, before any pixel is decoded.
    Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, not modified here) still applies.
    Every failure is an ``ImageError`` with a one-line message naming the file.
    """
    if isinstance(source, bytes):
        path: Path | str = f"<{len(source)} bytes>"
        data: Path | io.BytesIO = io.BytesIO(source)
    else:
        path = data = Path(source)
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if path.is_dir():
            raise ImageError(f"image path is a directory, not a file: {path}")
    try:
        if (len(source) if isinstance(source, bytes) else os.stat(source).st_size) == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}")
        with Image.open(data) as opened:
            width, height = opened.size
            if width <= 0 or height <= 0:
                raise ImageError(f"image has zero size ({width}x{height}): {path}")
            if width * height > max_pixels:
                raise ImageError(
                    f"image too large: {width}x{height} = {width * height} pixels exceeds "
                    f"max_pixels={max_pixels}: {path}"
                )
            # A full decode here, so a truncated or corrupt file fails now rather than half-loaded later.
            opened.load()
            upright = ImageOps.exif_transpose(opened)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception only when the caller's warning filters say "error".
        raise ImageError(f"image too large (decompression bomb guard): {path}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not an image, or a corrupt or unsupported format: {path}") from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read image: {path}: {exc.strerror}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated data and corrupt headers/chunks through these.
        raise ImageError(f"image is truncated or corrupt: {path}: {exc}") from exc
    try:
        return _to_rgb(upright)
    except ValueError as exc:
        raise ImageError(f"{exc}: {path}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with alpha composited on white and 16-bit data scaled to 8 bits."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Pillow's own I;16 -> L conversion clips at 255, which turns most 16-bit images white.
        # "I" (32-bit) is how some decoders hold 16-bit samples, so it is read on the same 0..65535 scale.
        samples = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(samples, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB ({exc})") from exc


# ---------------------------------------------------------------------------------------------------------
# Tiling


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """The (cols, rows) grids the official code tries, in the order it tries them.

    The official code collects the grids into a ``set`` and then stable-sorts by area, so grids of equal area
    come in CPython's set iteration order, not loop order. That order decides exact ties (e.g. 2.5:1 with
    min = max = 4, where 4x1 and 2x2 are equally close), so it is reproduced by building the same set.
    """
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def _check_tiling(min_tiles: int, max_tiles: int, image_size: int) -> None:
    if min_tiles < 1:
        raise ValueError(f"min_tiles must be >= 1, got {min_tiles}")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles ({max_tiles}) must be >= min_tiles ({min_tiles})")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")


def find_grid(
    width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """The (cols, rows) tile grid InternVL2 picks for a ``width`` x ``height`` image.

    Closest aspect ratio wins; on an exact tie a later (larger) grid replaces the current one only if the
    image has more than half the pixels the larger grid would hold, so small images are not blown up.
    """
    _check_tiling(min_tiles, max_tiles, image_size)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> int:
    """Tiles ``dynamic_tiles`` yields for an image of this size (thumbnail included), without any pixels."""
    cols, rows = find_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    grid = cols * rows
    return grid + 1 if use_thumbnail and grid > 1 else grid


def dynamic_tiles(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Cut ``image`` into ``image_size`` squares on the chosen grid, row-major, plus a thumbnail last."""
    width, height = image.size
    cols, rows = find_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size)
    bicubic = Image.Resampling.BICUBIC
    resized = image.resize((cols * image_size, rows * image_size), bicubic)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), bicubic))
    return tiles


def tiles_to_tensor(tiles: list[Image.Image]) -> torch.Tensor:
    """RGB tiles of one size -> float32 ``[T, 3, S, S]``, scaled to [0, 1] then ImageNet-normalised."""
    if not tiles:
        raise ValueError("no tiles to stack")
    size = tiles[0].size
    for tile in tiles:
        if tile.mode != "RGB" or tile.size != size:
            raise ValueError(f"tiles must all be RGB and {size}, got {tile.mode} {tile.size}")
    import torch  # here, not above: tiling an image (``ptp infer --check``) needs no torch

    pixels = torch.from_numpy(np.stack([np.asarray(tile) for tile in tiles]))  # [T, S, S, 3] uint8
    pixels = pixels.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # [T, 3, S, S]
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std).contiguous()


def preprocess(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """An RGB image -> the model's pixel input, float32 ``[T, 3, image_size, image_size]``."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    tiles = dynamic_tiles(
        image, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size, use_thumbnail=use_thumbnail
    )
    return tiles_to_tensor(tiles)


@dataclass(frozen=True)
class TilingOptions:
    """How images are tiled; one value per run, with per-record overrides made by ``dataclasses.replace``."""

    min_tiles: int = 1  # fewest grid tiles (thumbnail not counted)
    max_tiles: int = 12  # most grid tiles (thumbnail not counted); InternVL2 ships 12, its eval scripts use 6
    image_size: int = 448  # tile side in pixels, the ViT's input size
    use_thumbnail: bool = True  # append a whole-image tile when the grid has more than one tile

    def __post_init__(self) -> None:
        _check_tiling(self.min_tiles, self.max_tiles, self.image_size)

    @classmethod
    def from_config(cls, config: ModelConfig, *, max_tiles: int | None = None) -> TilingOptions:
        """The checkpoint's own tiling, optionally with a different tile cap."""
        return cls(
            min_tiles=config.min_dynamic_patch,
            max_tiles=config.max_dynamic_patch if max_tiles is None else max_tiles,
            image_size=config.vision.image_size,
            use_thumbnail=config.use_thumbnail,
        )

    def num_tiles(self, width: int, height: int) -> int:
        return num_tiles(
            width, height, min_tiles=self.min_tiles, max_tiles=self.max_tiles,
            image_size=self.image_size, use_thumbnail=self.use_thumbnail,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(
            image, min_tiles=self.min_tiles, max_tiles=self.max_tiles,
            image_size=self.image_size, use_thumbnail=self.use_thumbnail,
        )


def record_tiling(base: TilingOptions, overrides: Mapping[str, int | float]) -> TilingOptions:
    """The run's tiling with a record's ``max_tiles`` / ``min_tiles`` on top; RecordError if they clash."""
    if overrides.get("max_tiles") is None and overrides.get("min_tiles") is None:
        return base
    try:
        return dataclasses.replace(
            base,
            max_tiles=int(overrides.get("max_tiles") or base.max_tiles),
            min_tiles=int(overrides.get("min_tiles") or base.min_tiles),
        )
    except ValueError as e:
        raise RecordError(f"bad tiling override: {e}", kind="invalid_record") from None
