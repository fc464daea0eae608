"""``ptp bench`` on the tiny model (CPU): every row is there, speedups are the rows' own ratios, the JSON
schema is stable, and the command runs end to end. Nothing here asserts a timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptp_cli.bench import (
    PEER,
    SCHEMA_VERSION,
    BenchConfig,
    BenchReport,
    TokenIds,
    build_requests,
    format_report,
    parse_image_size,
    parse_methods,
    parse_ratios,
    peer_config,
    random_model,
    run_bench,
)
from ptp_cli.config import SHAPES
from ptp_cli.errors import UsageError
from ptp_cli.image import TilingOptions
from ptp_cli.pruning import METHODS, PruneConfig, make_method

RATIOS = (0.5, 0.75)
SMALL = dict(model="tiny", image_size=(448, 448), max_tiles=1, batch_size=2, new_tokens=2, warmup=0, repeats=1)


@pytest.fixture(scope="module")
def report(ptp_home: Path) -> BenchReport:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTP_HOME", str(ptp_home))  # conftest's, with the tiny checkpoint already built
        return run_bench(BenchConfig(**SMALL, ratios=RATIOS))


def expected_rows(cfg) -> list[tuple[str, str | None, float | None]]:
    rows = [(PEER, None, None), ("none", "none", None)]
    for name in sorted(m for m in METHODS if m != "none"):
        if "ratio" in make_method(PruneConfig(method=name), cfg).settings():
            rows += [(f"{name}@{r:g}", name, r) for r in RATIOS]
        else:  # vtw, pdrop: the ratio changes nothing, so one row
            rows.append((name, name, None))
    return rows


# ---------------------------------------------------------------------------------------------------------
# The report


def test_every_row_is_there(report: BenchReport) -> None:
    from ptp_cli.builders.tiny import tiny_config

    cfg = tiny_config(8)  # only the layer counts matter for method validation
    assert [(r.name, r.method, r.ratio) for r in report.rows] == expected_rows(cfg)
    assert report.rows[0].engine == "transformers"
    assert all(r.engine == "ptp" for r in report.rows[1:])


def test_speedups_are_ratios_of_the_row_medians(report: BenchReport) -> None:
    peer, none = report.row(PEER), report.row("none")
    for r in report.rows:
        assert r.speedup_vs_peer == pytest.approx(r.samples_per_s.median / peer.samples_per_s.median)
        assert r.speedup_vs_none == pytest.approx(r.samples_per_s.median / none.samples_per_s.median)
        assert r.samples_per_s.median == pytest.approx(2 / r.wall_s.median)  # batch 2, one repeat
        assert r.samples_per_s.min <= r.samples_per_s.median <= r.samples_per_s.max
    assert none.speedup_vs_none == pytest.approx(1.0)
    assert peer.speedup_vs_peer == pytest.approx(1.0)


def test_flops_and_tokens_follow_the_ratio(report: BenchReport) -> None:
    none, peer = report.row("none"), report.row(PEER)
    assert peer.flops_per_sample == none.flops_per_sample  # the peer does ptp none's work
    assert none.visual_tokens == peer.visual_tokens == 256
    assert report.row("ptp@0.5").visual_tokens == 128
    assert report.row("ptp@0.75").visual_tokens == 64
    for r in report.rows[1:]:
        total = r.flops_per_sample["total"]
        assert total == sum(r.flops_per_sample[k] for k in ("vit", "probe", "prefill", "decode"))
        assert r.flops_ratio_vs_none == pytest.approx(none.flops_per_sample["total"] / total)
        assert r.ttft_s.median == pytest.approx(sum(r.stages_s[k].median for k in ("vit", "probe", "prefill")))
    assert report.row("ptp@0.75").flops_per_sample["prefill"] < report.row("ptp@0.5").flops_per_sample["prefill"]


def test_peer_shares_weights_and_generates_the_same_tokens(report: BenchReport) -> None:
    assert report.model["peer_weights"] == "shared"
    assert report.peer_tokens_match is True


def test_workload_and_checks(report: BenchReport) -> None:
    assert report.workload["tiles"] == 1 and report.workload["thumbnail"] is False
    assert report.workload["visual_tokens"] == 256
    assert {c.status for c in report.checks} == {"n.a."}  # CPU, tiny: not the setup
    text = format_report(report)
    assert all(r.name in text for r in report.rows)
    assert "n.a." in text


def test_json_schema(report: BenchReport) -> None:
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert isinstance(data["device"]["name"], str) and data["device"]["type"] == "cpu"
    assert data["device"]["matmul_tflops"] > 0
    assert {"torch", "transformers", "ptp", "python"} <= data["versions"].keys()
    assert data["config"]["batch_size"] == 2 and data["config"]["dtype"] == "float32"
    assert {"image_size", "tiles", "visual_tokens", "prompt_tokens", "batch_size", "new_tokens"} <= data["workload"].keys()
    assert isinstance(data["preprocess_s_per_sample"], float)
    stat = {"median", "min", "max", "n"}
    row_keys = {"name", "engine", "method", "ratio", "settings", "samples_per_s", "wall_s", "ttft_s", "stages_s",
                "peak_memory_bytes", "visual_tokens", "flops_per_sample", "prefill_tflops",
                "prefill_pct_of_matmul", "speedup_vs_peer", "speedup_vs_none", "flops_ratio_vs_none"}
    for row in data["rows"]:
        assert row.keys() == row_keys
        assert row["samples_per_s"].keys() == stat and row["ttft_s"].keys() == stat
        assert row["peak_memory_bytes"] is None  # CPU
        assert isinstance(row["speedup_vs_peer"], float) and math.isfinite(row["speedup_vs_peer"])
        if row["engine"] == "ptp":
            assert row["stages_s"].keys() == {"vit", "probe", "prefill", "decode"}
            assert all(v.keys() == stat for v in row["stages_s"].values())
            assert row["flops_per_sample"].keys() == {"vit", "probe", "prefill", "decode", "total"}
            assert row["prefill_tflops"].keys() == stat
    for check in data["checks"]:
        assert check.keys() == {"name", "value", "target", "status", "note"}
        assert check["status"] in {"PASS", "FAIL", "n.a."}


# ---------------------------------------------------------------------------------------------------------
# Inputs


def test_parse_options() -> None:
    assert parse_image_size("1344x896") == (1344, 896)
    assert parse_ratios("0.5, 0.75,0.5") == (0.5, 0.75)
    assert parse_methods("ptp,none,fastv") == ("ptp", "fastv")
    for bad in ("1344", "axb", "0x10", "12by3"):
        with pytest.raises(UsageError, match="--image-size"):
            parse_image_size(bad)
    for bad in ("1.0", "x", ""):
        with pytest.raises(UsageError, match="--ratios"):
            parse_ratios(bad)
    with pytest.raises(UsageError, match="--methods"):
        parse_methods("ptp,bogus")


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"shape": "internvl2-3b"}, "--shape"), ({"model": "tiny", "shape": "internvl2-2b"}, "--model or --shape"),
     ({"batch_size": 0}, "--batch-size"), ({"repeats": 0}, "--repeats"), ({"dtype": "int8"}, "--dtype"),
     ({"device": "tpu"}, "--device"), ({"methods": ("nope",)}, "--methods")],
)
def test_config_errors_name_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(UsageError, match=option) as err:
        BenchConfig(**kwargs).validate()
    assert "\n" not in str(err.value)


def test_synthetic_requests() -> None:
    cfg = SHAPES["internvl2-2b"]
    tiling = TilingOptions.from_config(cfg, max_tiles=6)
    assert tiling.num_tiles(1344, 896) == 7  # the 6 tiles + thumbnail
    ids = TokenIds.for_vocab(cfg.llm.vocab_size)
    pixels = torch.zeros(7, 3, 448, 448)
    reqs = build_requests(pixels, ids, batch_size=3, tokens_per_tile=256, question_tokens=20, new_tokens=4, seed=0)
    assert len({tuple(r.ids) for r in reqs}) == 3  # each sample its own text
    for r in reqs:
        n = 7 * 256
        assert r.ids[r.image_start : r.image_start + n] == [ids.image] * n
        assert r.ids.count(ids.image) == n  # no stray placeholder in the text (the peer counts them all)
        assert r.ids[r.image_start - 1] == ids.img_start and r.ids[r.image_start + n] == ids.img_end
        assert r.instruction[1] - r.instruction[0] == 20 and r.ids[0] == ids.bos
        assert r.ignore_eos and r.max_new_tokens == 4 and r.has_thumbnail


def test_random_model_is_built_in_place() -> None:
    import dataclasses

    from ptp_cli.builders.tiny import tiny_config

    cfg = tiny_config(64)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_word_embeddings=True))
    model = random_model(cfg, dtype=torch.bfloat16, device=torch.device("cpu"), seed=0)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(not t.is_meta and t.dtype == torch.bfloat16 for t in tensors)
    lm = model.language_model
    assert lm.output.weight is lm.tok_embeddings.weight


@pytest.mark.parametrize("shape", ["internvl2-1b", "internvl2-2b", "internvl2-4b"])
def test_peer_has_the_same_parameter_count(shape: str) -> None:
    from transformers import InternVLForConditionalGeneration

    from ptp_cli.models.internvl import InternVLModel

    cfg = SHAPES[shape]
    with torch.device("meta"):
        peer = InternVLForConditionalGeneration._from_config(peer_config(cfg, image_token_id=cfg.llm.vocab_size - 1))
        ours = InternVLModel(cfg)
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())


# ---------------------------------------------------------------------------------------------------------
# The command


def test_cli_runs_and_writes_json(tmp_path: Path, ptp_home: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tiny", "--image-size", "448x448", "--max-tiles", "1", "--batch-size", "2",
            "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--methods", "ptp", "--ratios", "0.5",
            "--no-peer", "--json", str(out)]  # the peer is covered in-process above
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")} | {"PTP_HOME": str(ptp_home)}
    proc = subprocess.run([sys.executable, "-m", "ptp_cli.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["none", "ptp@0.5"]
    assert data["rows"][1]["speedup_vs_peer"] is None and data["peer_tokens_match"] is None
    assert "ptp@0.5" in proc.stdout and "samples/s" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--shape", "internvl2-3b"], "--shape: unknown shape 'internvl2-3b'"),
     (["--image-size", "12by3"], "--image-size must be WIDTHxHEIGHT")],
)
def test_cli_usage_errors_exit_2_with_one_line(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ptp_cli.cli import main as cli_main

    monkeypatch.setattr(sys, "argv", ["ptp", "bench", *args])
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
