"""Image loading and InternVL2 tiling.

The main correctness proof is parity with transformers' independent implementation of the same tiling
(``GotOcr2ImageProcessorPil`` with ``crop_to_patches=True``, which the InternVL processor uses): same grid,
same tile count, same pixels. Loading is checked against hand-computed pixels for every Pillow mode.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ptp_cli.builders.tiny import TINY
from ptp_cli.config import SHAPES
from ptp_cli.errors import ImageError
from ptp_cli.preprocess.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingOptions,
    dynamic_tiles,
    find_grid,
    load_image,
    num_tiles,
    preprocess,
    tiles_to_tensor,
)

# Both sides resize with Pillow's bicubic filter on the same uint8 image, so tiles are bit-identical and the
# only possible difference is float rounding in rescale/normalise (numpy vs torch, different op order):
# a few ULPs of values in [-2.2, 2.7], far below 1e-5.
PIXEL_ATOL = 1e-5

SIZES = [
    (1, 1), (2, 1), (1, 2), (448, 448), (896, 448), (448, 1344), (1344, 896), (5000, 20), (20, 5000),
    (2400, 300), (300, 2000), (1000, 700), (700, 1000), (1023, 767), (333, 777), (4000, 3000), (97, 31),
    (1920, 1080), (1080, 1920), (3000, 100), (640, 480), (13, 4000), (1792, 1792), (449, 447),
]
TILE_RANGES = [(1, 12), (1, 6), (1, 4), (1, 1), (2, 6), (4, 12), (3, 9), (1, 40)]


@pytest.fixture(scope="module")
def hf():
    """transformers' GOT-OCR2 PIL image processor module (imported lazily: it takes a few seconds)."""
    from transformers.models.got_ocr2 import image_processing_pil_got_ocr2

    return image_processing_pil_got_ocr2


def hf_grid(hf, width: int, height: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    # transformers takes (height, width) pairs and returns (columns, rows).
    return hf.get_optimal_tiled_canvas((height, width), (448, 448), min_tiles, max_tiles)


def make_image(width: int, height: int, *, seed: int = 0) -> Image.Image:
    """Gradients plus noise, so any misplaced tile or wrong resample shows up in the pixels."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    noisy = base + rng.normal(0, 30, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------------------------------------------------
# Grid choice


@pytest.mark.parametrize(("min_tiles", "max_tiles"), TILE_RANGES)
def test_grid_matches_transformers(hf, min_tiles: int, max_tiles: int) -> None:
    for width, height in SIZES:
        ours = find_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles)
        assert ours == hf_grid(hf, width, height, min_tiles, max_tiles), (width, height)
        assert min_tiles <= ours[0] * ours[1] <= max_tiles


def test_grid_known_values() -> None:
    # Worked by hand from the rule: closest aspect ratio among grids of 1..12 tiles.
    assert find_grid(1, 1) == (1, 1)
    assert find_grid(896, 448) == (2, 1)
    assert find_grid(5000, 20) == (12, 1)
    assert find_grid(5000, 20, max_tiles=6) == (6, 1)
    assert find_grid(20, 5000) == (1, 12)
    # 1.78: 2/1 beats 3/2 (diff 0.22 vs 0.28) and ties with 4/2; 1920x1080 exceeds half of 8 tiles' pixels.
    assert find_grid(1920, 1080) == (4, 2)
    assert find_grid(960, 540) == (2, 1)
    # Squares tie 1x1, 2x2 and 3x3; 900x900 has more than half of 2x2's pixels (401k) but not of 3x3's (903k).
    assert find_grid(900, 900) == (2, 2)
    assert find_grid(1000, 1000) == (3, 3)
    assert find_grid(400, 400) == (1, 1)
    assert find_grid(2000, 2000) == (3, 3)


def test_exact_ties_follow_official_candidate_order(hf) -> None:
    # The official code sorts a *set* of grids by area, so equal-area grids come in CPython's set order
    # ((4, 1), (1, 4), (2, 2) for 4 tiles), while transformers keeps loop order ((1, 4), (2, 2), (4, 1)).
    # They differ only on exact float ties between equal-area grids, possible only when min_tiles > 1.
    # 2.5:1 is exactly 1.5 away from both 4/1 and 2/2.
    assert find_grid(220, 88, min_tiles=4, max_tiles=4) == (4, 1)  # small: the first of the tie stays
    assert hf_grid(hf, 220, 88, 4, 4) == (2, 2)
    assert find_grid(1090, 436, min_tiles=4, max_tiles=4) == (2, 2)  # large: the later grid takes over
    assert hf_grid(hf, 1090, 436, 4, 4) == (4, 1)


def _all_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    return [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles]


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20_000),
    height=st.integers(1, 20_000),
    min_tiles=st.integers(1, 12),
    extra=st.integers(0, 30),
)
def test_grid_properties(hf, width: int, height: int, min_tiles: int, extra: int) -> None:
    max_tiles = min_tiles + extra
    cols, rows = find_grid(width, height, min_tiles=min_tiles, max_tiles=max_tiles)
    assert min_tiles <= cols * rows <= max_tiles
    aspect = width / height
    best = min(abs(aspect - c / r) for c, r in _all_grids(min_tiles, max_tiles))
    assert abs(aspect - cols / rows) == best
    # Against transformers: identical, or an exact tie between grids of equal area (see the test above).
    theirs = hf_grid(hf, width, height, min_tiles, max_tiles)
    if theirs != (cols, rows):
        assert abs(aspect - theirs[0] / theirs[1]) == best
        assert theirs[0] * theirs[1] == cols * rows
        assert min_tiles > 1


def test_bad_tile_ranges_raise() -> None:
    with pytest.raises(ValueError, match="min_tiles"):
        find_grid(10, 10, min_tiles=0)
    with pytest.raises(ValueError, match="max_tiles"):
        find_grid(10, 10, min_tiles=5, max_tiles=4)
    with pytest.raises(ValueError, match="size"):
        find_grid(0, 10)
    with pytest.raises(ValueError, match="max_tiles"):
        TilingOptions(min_tiles=3, max_tiles=2)


# ---------------------------------------------------------------------------------------------------------
# Tiles and tensors


@pytest.mark.parametrize(
    ("width", "height", "min_tiles", "max_tiles"),
    [(1, 1, 1, 12), (1000, 700, 1, 12), (5000, 20, 1, 6), (300, 2000, 1, 12), (896, 448, 2, 6), (449, 447, 1, 4)],
)
def test_pixels_match_transformers(hf, width: int, height: int, min_tiles: int, max_tiles: int) -> None:
    image = make_image(width, height)
    processor = hf.GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=min_tiles, max_patches=max_tiles,
        size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    theirs = processor(images=image, return_tensors="np", input_data_format="channels_last")
    ours = preprocess(image, min_tiles=min_tiles, max_tiles=max_tiles)
    assert ours.dtype == torch.float32
    assert ours.shape[0] == theirs["num_patches"][0]
    assert ours.shape[0] == num_tiles(width, height, min_tiles=min_tiles, max_tiles=max_tiles)
    np.testing.assert_allclose(ours.numpy(), theirs["pixel_values"], rtol=0, atol=PIXEL_ATOL)


def test_tiles_are_row_major_crops_then_thumbnail() -> None:
    # 1344x896 is exactly a 3x2 grid, so the resize is the identity and tiles are plain crops.
    image = make_image(1344, 896, seed=1)
    tiles = dynamic_tiles(image)
    assert len(tiles) == 7
    pixels = np.asarray(image)
    for i in range(6):
        row, col = divmod(i, 3)
        expected = pixels[row * 448 : (row + 1) * 448, col * 448 : (col + 1) * 448]
        np.testing.assert_array_equal(np.asarray(tiles[i]), expected)
    thumbnail = image.resize((448, 448), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(thumbnail))


def test_single_tile_has_no_thumbnail() -> None:
    assert len(dynamic_tiles(make_image(1, 1))) == 1
    assert len(dynamic_tiles(make_image(500, 480))) == 1
    assert len(dynamic_tiles(make_image(1000, 700), use_thumbnail=False)) == 6
    assert num_tiles(1000, 700, use_thumbnail=False) == 6
    assert num_tiles(1, 1) == 1


def test_tensor_normalisation() -> None:
    tile = make_image(448, 448, seed=2)
    tensor = tiles_to_tensor([tile, tile])
    assert tensor.shape == (2, 3, 448, 448)
    raw = np.asarray(tile).astype(np.float64) / 255.0  # [S, S, 3]
    expected = ((raw - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(tensor[1].numpy(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        tiles_to_tensor([tile, tile.convert("L")])


def test_options_from_config() -> None:
    options = TilingOptions.from_config(SHAPES["internvl2-2b"])
    assert options == TilingOptions(min_tiles=1, max_tiles=12, image_size=448, use_thumbnail=True)
    assert TilingOptions.from_config(TINY, max_tiles=4).max_tiles == 4
    image = make_image(1000, 700)
    four = TilingOptions(max_tiles=4)
    # 1.43: 1/1 and 2/2 tie (diff 0.43); 700k pixels > half of 2x2's 803k, so 2x2 + thumbnail.
    assert four.num_tiles(1000, 700) == 5
    assert four.num_tiles(500, 350) == 1
    assert torch.equal(four.preprocess(image), preprocess(image, max_tiles=4))


# ---------------------------------------------------------------------------------------------------------
# Loading: conversions


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def test_rgb_roundtrip(tmp_path: Path) -> None:
    image = make_image(31, 17)
    loaded = load_image(_save(image, tmp_path / "a.png"))
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_one_pixel_image_is_valid(tmp_path: Path) -> None:
    loaded = load_image(_save(Image.new("RGB", (1, 1), (10, 20, 30)), tmp_path / "one.png"))
    assert loaded.size == (1, 1)
    assert preprocess(loaded).shape == (1, 3, 448, 448)


def test_palette(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    image.putdata([0, 1, 2])
    loaded = load_image(_save(image, tmp_path / "p.png"))
    assert np.asarray(loaded).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]
    # Palette index 1 transparent: composited on white.
    loaded = load_image(_save(image, tmp_path / "pt.png", transparency=1))
    assert np.asarray(loaded).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[200, 10, 50, 255], [200, 10, 50, 0], [0, 0, 0, 128], [40, 80, 160, 64]]], np.uint8)
    loaded = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))).astype(int)
    alpha = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    np.testing.assert_allclose(loaded, expected, atol=1)
    assert loaded[0, 1].tolist() == [255, 255, 255]
    assert loaded[0, 0].tolist() == [200, 10, 50]


def test_la_and_l(tmp_path: Path) -> None:
    la = np.array([[[30, 255], [30, 0]]], np.uint8)
    loaded = np.asarray(load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png")))
    assert loaded.tolist() == [[[30, 30, 30], [255, 255, 255]]]
    grey = np.array([[0, 77, 255]], np.uint8)
    loaded = np.asarray(load_image(_save(Image.fromarray(grey, "L"), tmp_path / "l.png")))
    assert loaded.tolist() == [[[v, v, v] for v in (0, 77, 255)]]


def test_cmyk(tmp_path: Path) -> None:
    # Pure inks: no ink is white, full cyan is (0, 255, 255), full black is black (any CMYK->RGB formula).
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], np.uint8)
    loaded = np.asarray(load_image(_save(Image.fromarray(cmyk, "CMYK"), tmp_path / "c.tiff")))
    assert loaded.tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]]]


@pytest.mark.parametrize(("dtype", "mode"), [(np.uint16, "I;16"), (np.int32, "I")])
def test_sixteen_bit_scaled_not_clipped(tmp_path: Path, dtype: type, mode: str) -> None:
    samples = np.array([[0, 257, 257 * 100, 32768, 65535]], dtype=dtype)
    image = Image.fromarray(samples)
    assert image.mode == mode
    suffix = ".png" if mode == "I;16" else ".tiff"  # PNG cannot hold mode I
    loaded = np.asarray(load_image(_save(image, tmp_path / f"s{suffix}")))
    assert loaded[..., 0].tolist() == [[0, 1, 100, 128, 255]]  # round(v / 257)
    assert (loaded[..., 0] == loaded[..., 2]).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = make_image(40, 20, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90 degrees clockwise for display
    loaded = load_image(_save(stored, tmp_path / "r.png", exif=exif.tobytes()))
    assert loaded.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(loaded), np.rot90(np.asarray(stored), k=-1))


# ---------------------------------------------------------------------------------------------------------
# Loading: errors


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose pixel data is empty: cheap to write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"not found: .*nope\.png") as info:
        load_image(tmp_path / "nope.png")
    assert info.value.kind == "image_error"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=r"not an image.*notes\.png"):
        load_image(path)


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)


def test_zero_size(tmp_path: Path) -> None:
    # Pillow itself refuses to identify a 0-wide PNG; either way it must be an ImageError naming the file.
    path = tmp_path / "zero.png"
    path.write_bytes(_png_header_only(0, 5))
    with pytest.raises(ImageError, match=r"zero\.png"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    make_image(200, 150).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_too_many_pixels_refused_before_decoding(tmp_path: Path) -> None:
    # The pixel data is missing, so a decode would fail as "truncated": "too large" proves the header check
    # came first.
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(3000, 2000))
    with pytest.raises(ImageError, match=r"too large: 3000x2000 = 6000000 pixels exceeds max_pixels=1000000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(path, max_pixels=10_000_000)


def test_pillow_decompression_bomb_error(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 10_000))  # over twice Pillow's limit: Pillow raises
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path, max_pixels=10**12)


def test_pillow_decompression_bomb_warning(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))  # over Pillow's limit: Pillow warns
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(path, max_pixels=10**12)
    # With ordinary filters Pillow only warns, and the default max_pixels (Pillow's limit) refuses the image.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="too large"):
        load_image(path)
