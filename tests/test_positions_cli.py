"""--positions and the pool / tiles baselines through the commands, on real files with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_cli import jsonl, one_error_line, ptp, read_rows

from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.preprocess.retile import fewer_tiles

SIZES = {"wide.png": (900, 450), "tall.png": (300, 700), "small.png": (200, 200)}


def _images(folder: Path) -> None:
    rng = np.random.default_rng(1)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)


def test_fewer_tiles_fit_the_budget_and_keep_the_thumbnail():
    tiling = TilingOptions(max_tiles=12)
    for (w, h), ratio in (((1800, 900), 0.5), ((1800, 900), 0.75), ((900, 450), 0.25), ((300, 300), 0.5)):
        fewer, full = fewer_tiles(tiling, w, h, ratio=ratio, tokens_per_tile=256)
        assert full == tiling.num_tiles(w, h)
        n = fewer.num_tiles(w, h)
        budget = round((1 - ratio) * 256 * full)
        assert n * 256 <= budget or n == 1  # one view is the least the model can see
        more = TilingOptions(max_tiles=fewer.max_tiles + 1).num_tiles(w, h) if fewer.max_tiles < 12 else None
        assert more is None or more * 256 > budget or more == n  # the largest cap that fits
        if n > 1:
            assert n - 1 <= fewer.max_tiles  # a grid plus its thumbnail


FAST = [("tiles", "original")]  # pool and both modes: the eval grid test below; every pair: slow
EVERY = [(m, p) for m in ("pool", "tiles", "ptp", "random", "spatial") for p in ("original", "contiguous")]


@pytest.mark.parametrize("pairs", [FAST, pytest.param([x for x in EVERY if x not in FAST], marks=pytest.mark.slow)])
def test_infer_pool_and_tiles_with_either_positions_on_a_padded_batch(tmp_path: Path, ptp_home: Path, pairs):
    _images(tmp_path)
    records = jsonl(tmp_path / "q.jsonl", [{"id": n, "image": n, "question": "What?" * (i + 1)}
                                           for i, n in enumerate(SIZES)])
    for method, mode in pairs:
        out = tmp_path / f"{method}-{mode}.jsonl"
        proc = ptp("infer", records, "--model", "tiny", "--method", method, "--positions", mode, "--ratio", "0.75",
                   "--max-new-tokens", "2", "--batch-size", "3", "-o", out, "-q", home=ptp_home)
        assert proc.returncode == 0, proc.stderr
        rows = read_rows(out)
        assert [r["id"] for r in rows] == list(SIZES) and all(r.get("error") is None for r in rows), rows
        for r in rows:
            assert r["settings"]["positions"] == mode and r["method"] == method
            t = r["tokens"]
            assert t["visual_after"] <= round(0.25 * t["visual_before"]) or t["tiles"] == 1
            if method == "tiles":
                assert t["tiles"] * 256 <= t["visual_before"]


def test_vllm_with_original_positions_is_a_usage_error(tmp_path: Path, ptp_home: Path):
    _images(tmp_path)
    records = jsonl(tmp_path / "q.jsonl", [{"id": "a", "image": "wide.png", "question": "What?"}])
    proc = ptp("infer", records, "--model", "tiny", "--engine", "vllm", "--method", "random", "--positions", "original",
               home=ptp_home)
    assert proc.returncode == 2
    assert "--positions original" in one_error_line(proc) and "--positions contiguous" in proc.stderr
    bad = ptp("infer", records, "--model", "tiny", "--positions", "sideways", home=ptp_home)
    assert bad.returncode == 2 and "--positions must be one of original, contiguous" in one_error_line(bad)


@pytest.mark.slow  # in CI's own step (.ci/run): keeps the default run under 10 minutes on 2 cores
def test_eval_grid_positions_axis_and_baselines(tmp_path: Path, ptp_home: Path):
    _images(tmp_path)
    gold = jsonl(tmp_path / "gold.jsonl", [
        {"id": "a", "image": "wide.png", "question": "Is it noisy?", "answer": "yes"},
        {"id": "b", "image": "tall.png", "question": "What colour?", "answer": "red"},
    ])
    out, report, plot = tmp_path / "runs", tmp_path / "report.json", tmp_path / "plot.png"
    proc = ptp("eval", gold, "--model", "tiny", "--methods", "none,ptp,pool,tiles,fastv", "--ratios", "0.5",
               "--positions", "original,contiguous", "--max-new-tokens", "1", "--max-tiles", "2", "--out-dir", out,
               "--json", report, "--plot", plot, home=ptp_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    names = [r["name"] for r in data["runs"]]
    assert names == ["none", "ptp@0.5,positions=original", "ptp@0.5,positions=contiguous",
                     "pool@0.5,positions=original", "pool@0.5,positions=contiguous",
                     "tiles@0.5,positions=original", "tiles@0.5,positions=contiguous", "fastv@0.5"]
    for name in names[1:-1]:
        assert {r["settings"]["positions"] for r in read_rows(out / f"{name}.jsonl")} == {name.split("=")[1]}
    assert data["title"].startswith("tiny, n = 2, ") and data["title"].endswith("gold.jsonl")
    table = proc.stdout
    assert table.startswith(data["title"]) and "| 768 / 768 |" in table  # whole token counts (2 tiles + thumbnail)
    with Image.open(plot) as img:  # one panel per metric in use (exact and yesno here)
        assert img.size[1] > 2 * 500
