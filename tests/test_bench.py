"""``ptp bench`` on the tiny model (CPU): every row is there, FLOPs match a count done by hand, speedups match
the measured wall times, the peer generates ptp's tokens, the targets table decides PASS/FAIL, and the real
console script says what it will do, refuses a full-size model on a CPU and prints plain headers.
Nothing here asserts a timing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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
    BenchRow,
    Stat,
    format_report,
    parse_image_size,
    parse_methods,
    parse_ratios,
    peer_config,
    plan_bench,
    run_bench,
)
from ptp_cli.bench.report import si, sig
from ptp_cli.bench.targets import MAIN, Setup, Target, evaluate
from ptp_cli.bench.vllm_peer import STAND_IN, paired_vs_stand_in
from ptp_cli.bench.workload import SyntheticEncoder, TokenIds, input_processor
from ptp_cli.builders.tiny import random_state_dict, tiny_config
from ptp_cli.config import SHAPES
from ptp_cli.errors import UsageError
from ptp_cli.loading import build_model
from ptp_cli.pruning import METHODS, PruneConfig, make_method

RATIOS = (0.5, 0.75)
NEW_TOKENS = 2
SMALL = dict(model="tiny", image_size=(448, 448), max_tiles=1, batch_size=2, new_tokens=NEW_TOKENS, warmup=0,
             repeats=3)
PTP = Path(sys.executable).with_name("ptp")  # the installed console script
TIMEOUT = 300


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
    cfg = tiny_config(8)  # only the layer counts matter for method validation
    assert [(r.name, r.method, r.ratio) for r in report.rows] == expected_rows(cfg)
    assert report.rows[0].engine == "transformers"
    assert all(r.engine == "ptp" for r in report.rows[1:])


def test_speedups_are_paired_with_the_none_runs_around_each_row(report: BenchReport) -> None:
    """From the JSON's timeline: in every round none runs first, last and between every two rows, the others'
    order changes from round to round, and each speedup is the median over rounds of the row's rate over that
    of the none runs just before and after it (vs transformers: the two such ratios divided)."""
    data = json.loads(json.dumps(report.to_dict()))
    rows = {r["name"]: r for r in data["rows"]}
    rounds = data["rounds"]
    assert len(rounds) == 3
    others = []
    for runs in rounds:
        names = [name for name, _ in runs]
        assert names[::2] == ["none"] * len(rows) and sorted(names[1::2]) == sorted(set(rows) - {"none"})
        others.append(names[1::2])
    assert others[0] != others[1] and others[1] != others[2]  # the order alternates
    ratios: dict[str, list[float]] = {name: [] for name in rows}
    for runs in rounds:
        for p in range(1, len(runs), 2):
            ratios[runs[p][0]].append(math.sqrt(runs[p - 1][1] * runs[p + 1][1]) / runs[p][1])
    ratios["none"] = [1.0] * 3
    for name, r in rows.items():
        assert r["paired_vs_none"]["n"] == 3
        assert r["speedup_vs_none"] == pytest.approx(sorted(ratios[name])[1]) == r["paired_vs_none"]["median"]
        assert (r["paired_vs_none"]["min"], r["paired_vs_none"]["max"]) == pytest.approx(
            (min(ratios[name]), max(ratios[name])))
        vs_peer = sorted(a / b for a, b in zip(ratios[name], ratios[PEER], strict=True))
        assert r["speedup_vs_peer"] == pytest.approx(vs_peer[1])
        runs = 3 * (len(rows) if name == "none" else 1)
        assert r["wall_s"]["n"] == runs
        assert min(2 / w for w in (r["wall_s"]["min"], r["wall_s"]["max"])) == pytest.approx(r["samples_per_s"]["min"])
    assert rows[PEER]["speedup_vs_peer"] == 1.0 and rows["none"]["speedup_vs_none"] == 1.0


def test_a_spread_wider_than_the_effect_is_called_noise(report: BenchReport) -> None:
    def with_ratios(stats: dict[str, Stat]) -> BenchReport:
        rows = [dataclasses.replace(r, paired_vs_none=stats.get(r.name, Stat(1.0, 1.0, 1.0, 3)), paired_vs_peer=None)
                for r in report.rows]
        return dataclasses.replace(report, rows=rows)

    steady = format_report(with_ratios({"ptp@0.5": Stat(1.8, 1.7, 1.9, 3)}))
    assert "warning" not in steady and "1.80x (1.70-1.90)" in steady
    busy = format_report(with_ratios({"ptp@0.5": Stat(2.9, 0.4, 8.5, 3), "vtw": Stat(1.05, 0.98, 1.2, 3)}))
    warnings = [line for line in busy.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "within noise (ptp@0.5, vtw:" in warnings[0] and "--repeats N" in warnings[0]
    one = dataclasses.replace(report, config={**report.config, "repeats": 1})
    assert "one timed round" in format_report(one) and "--repeats N" in format_report(one)


def test_vllm_rows_pair_with_the_stand_in_for_vllms_own_internvl(report: BenchReport) -> None:
    # Per round, each row's rate over none's around it: vllm ptp@0.5 over vllm none is their quotient.
    vs_none = {"none": [1.0, 1.0, 1.0], "ptp@0.5": [1.5, 1.6, 1.4], "vllm none": [0.5, 0.25, 0.4],
               "vllm ptp@0.5": [1.0, 0.375, 1.0]}
    pairs = paired_vs_stand_in(vs_none)
    assert list(pairs) == ["vllm ptp@0.5"] and pairs["vllm ptp@0.5"] == Stat(2.0, 1.5, 2.5, 3)
    assert format_report(report).count("vLLM") == 0  # --engine ptp: nothing said
    peer = {"row": "vllm-internvl", "measured": False, "reason": "because", "stand_in": STAND_IN,
            "paired_vs_stand_in": pairs}
    lines = format_report(dataclasses.replace(report, vllm_peer=peer)).splitlines()
    assert "vLLM's own multimodal InternVL2, unpruned, is not a row: because." in lines
    assert lines[-1] == "ptp+vLLM over vllm none, paired through the same none runs: vllm ptp@0.5 2.00x (1.50-2.50)"


def _tiny_vit_flops(tiles: int) -> int:
    """The tiny ViT (C=32, 12 layers, MLP 64, 1024 patches + CLS) and projector (4C=128 -> 128 -> 128), by hand."""
    patches, tokens, c, mlp, layers = 1024, 1025, 32, 64, 12
    conv = 2 * patches * (3 * 14 * 14) * c
    per_layer = 2 * tokens * (c * 3 * c + c * c + 2 * c * mlp) + 2 * 2 * tokens * tokens * c  # linears + QK^T, PV
    projector = 2 * 256 * (4 * c * 128 + 128 * 128)
    return tiles * (conv + layers * per_layer + projector)


def _tiny_prefill_flops(tokens: int, vocab: int) -> int:
    """The tiny LLM (D=128, 4 heads of 32, 2 KV heads, MLP 256, 4 layers), causal, LM head on one position."""
    d, q, kv, mlp, layers = 128, 128, 64, 256, 4
    linears = 2 * tokens * (d * q + 2 * d * kv + q * d + 3 * d * mlp)
    attention = 2 * 2 * q * tokens * (tokens + 1) // 2
    return layers * (linears + attention) + 2 * d * vocab


def test_flops_match_a_count_by_hand(report: BenchReport, ptp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    vocab = plan_bench(BenchConfig(**SMALL)).cfg.llm.vocab_size
    none, peer = report.row("none"), report.row(PEER)
    assert none.flops_per_sample["vit"] == _tiny_vit_flops(1)
    assert none.flops_per_sample["prefill"] == _tiny_prefill_flops(report.workload["prompt_tokens"], vocab)
    # The peer's count comes from the workload's shape, ptp none's from what the engine ran: the same work.
    assert peer.flops_per_sample == none.flops_per_sample
    assert none.visual_tokens == peer.visual_tokens == 256
    assert report.row("ptp@0.5").visual_tokens == 128
    assert report.row("ptp@0.75").visual_tokens == 64
    # The baselines at the same budget: pool averages, tiles re-tiles (one view here, so it pools it down too).
    assert report.row("pool@0.5").visual_tokens == report.row("tiles@0.5").visual_tokens == 128
    # What the LLM processed: pruned before it, every layer sees the kept tokens; in-LLM methods, fewer later on.
    for name, mean, last in (("none", 256, 256), ("ptp@0.5", 128, 128), ("vtw", 128, 0), ("fastv@0.5", 192, 128)):
        row = report.row(name)
        assert (row.visual_tokens_layer_mean, row.visual_tokens_last_layer) == (mean, last), name
    pdrop = report.row("pdrop")
    assert pdrop.visual_tokens == 256 and pdrop.visual_tokens_last_layer < pdrop.visual_tokens_layer_mean < 256
    for r in report.rows[1:]:
        assert r.flops_per_sample["total"] == sum(r.flops_per_sample[k] for k in ("vit", "probe", "prefill", "decode"))
    assert report.row("ptp@0.75").flops_per_sample["prefill"] < report.row("ptp@0.5").flops_per_sample["prefill"]


def test_peer_shares_weights_and_generates_the_same_tokens(report: BenchReport) -> None:
    assert report.model["peer_weights"] == "shared"
    assert report.peer_tokens_match is True


def test_targets_are_not_applicable_here_and_opt_in(report: BenchReport) -> None:
    assert {c.status for c in report.checks} == {"n.a."}  # CPU, tiny: not the targets' setup
    plain = format_report(report)
    assert all(r.name in plain for r in report.rows)
    assert "target" not in plain.lower()
    assert "not applicable" in format_report(report, targets=True)


def _row(name: str, *, samples: float, peak: int | None = None, probe: float = 0.0) -> BenchRow:
    one = Stat(1.0, 1.0, 1.0, 1)
    return BenchRow(
        name=name, engine="ptp", method=name, ratio=None, settings={}, samples_per_s=Stat(samples, samples, samples, 1),
        wall_s=one, ttft_s=one, stages_s={"probe": Stat(probe, probe, probe, 1)}, peak_memory_bytes=peak,
        peak_memory_kind="cuda_allocated", visual_tokens=0.0, visual_tokens_layer_mean=0.0,
        visual_tokens_last_layer=0.0, flops_per_sample={}, prefill_tflops=None, prefill_pct_of_matmul=None,
    )


def test_targets_decide_from_the_table() -> None:
    """Made-up rows and thresholds: PASS and FAIL follow the table, n.a. outside the setup."""
    run = {"source": "internvl2-2b", "dtype": "bfloat16", "device_type": "cuda", "tiles": 7, "batch_size": 32,
           "new_tokens": 16}
    rows = [_row("none", samples=3.0, peak=30 << 30), _row("ptp@0.5", samples=5.0, peak=50 << 30, probe=0.05)]
    for r in rows:
        r.speedup_vs_peer = r.samples_per_s.median / 2.0
    targets = (
        Target("none over transformers", "speedup_vs_transformers", "none", ">=", 1.5, "x", MAIN),
        Target("ptp over transformers", "speedup_vs_transformers", "ptp@0.5", ">=", 2.6, "x", MAIN),
        Target("scoring share", "probe_pct_of_batch_time", "ptp@0.5", "<=", 10, "%", MAIN),
        Target("memory", "peak_memory_gib", None, "<=", 40, "GiB", MAIN),
        Target("memory, big batches", "peak_memory_gib", None, "<=", 40, "GiB", Setup("big", batch_size=(64, None))),
    )
    checks = evaluate(rows, run, targets)
    assert [(c.status, c.value) for c in checks] == [
        ("PASS", 1.5), ("FAIL", 2.5), ("PASS", pytest.approx(5.0)), ("FAIL", 50.0), ("n.a.", 50.0)]
    assert checks[1].target == ">= 2.6x"
    assert {c.status for c in evaluate(rows, {**run, "dtype": "float32"}, targets)} == {"n.a."}


def test_json_schema(report: BenchReport) -> None:
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert isinstance(data["device"]["name"], str) and data["device"]["type"] == "cpu"
    for when in ("before", "after"):  # the machine's load, 1, 5 and 15 minutes
        assert len(data["device"][f"load_average_{when}"]) == 3
    assert data["device"]["cpus"] >= 1
    assert data["device"]["matmul_tflops"] > 0
    assert {"torch", "transformers", "ptp", "python"} <= data["versions"].keys()
    assert data["config"]["batch_size"] == 2 and data["config"]["dtype"] == "float32"
    assert {"image_size", "tiles", "visual_tokens", "prompt_tokens", "batch_size", "new_tokens"} <= data["workload"].keys()
    assert isinstance(data["preprocess_s_per_sample"], float)
    stat = {"median", "min", "max", "n"}
    row_keys = {"name", "engine", "method", "ratio", "settings", "samples_per_s", "wall_s", "ttft_s", "stages_s",
                "peak_memory_bytes", "peak_memory_kind", "visual_tokens", "visual_tokens_layer_mean",
                "visual_tokens_last_layer", "flops_per_sample", "prefill_tflops", "prefill_pct_of_matmul",
                "speedup_vs_peer", "speedup_vs_none", "paired_vs_peer", "paired_vs_none", "flops_ratio_vs_none"}
    for row in data["rows"]:
        assert row.keys() == row_keys
        assert row["samples_per_s"].keys() == stat and row["ttft_s"].keys() == stat
        assert row["peak_memory_kind"] in ("cpu_rss", "cpu_rss_process")  # CPU: the process's resident set
        assert row["peak_memory_bytes"] > 10 * 2**20
        assert row["paired_vs_none"].keys() == stat and row["paired_vs_peer"].keys() == stat
        assert isinstance(row["speedup_vs_peer"], float) and math.isfinite(row["speedup_vs_peer"])
        assert row["flops_per_sample"].keys() == {"vit", "probe", "prefill", "decode", "total"}
        if row["engine"] == "ptp":
            assert row["stages_s"].keys() == {"vit", "probe", "prefill", "decode"}
            assert all(v.keys() == stat for v in row["stages_s"].values())
            assert row["prefill_tflops"].keys() == stat
    for check in data["checks"]:
        assert check.keys() == {"name", "value", "target", "status", "note", "unit"}
        assert check["status"] in {"PASS", "FAIL", "n.a."}


def test_numbers_keep_significant_figures() -> None:
    assert [sig(v) for v in (0.000123456, 0.0042, 12.345, 1234.5, 0.0)] == ["0.000123", "0.00420", "12.3", "1234", "0"]
    assert si(3.1e12, "FLOP") == "3.10 TFLOP" and si(0.004) == "0.00400" and si(2.2e9) == "2.20 G"


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


def test_synthetic_requests_come_from_the_input_processor() -> None:
    cfg = SHAPES["internvl2-2b"]
    config = BenchConfig(shape="internvl2-2b", question_tokens=20, new_tokens=4)
    ids = TokenIds.for_vocab(cfg.llm.vocab_size)
    processor = input_processor(config, cfg, ids, dtype=torch.bfloat16)
    assert processor.tiling.num_tiles(1344, 896) == 7  # 6 tiles + thumbnail
    assert isinstance(processor.encoder, SyntheticEncoder)
    pixels = torch.zeros(7, 3, 448, 448, dtype=torch.bfloat16)
    reqs = [processor.request(f"sample {i}", pixels) for i in range(3)]
    assert len({tuple(r.ids) for r in reqs}) == 3  # each sample its own text
    assert processor.request("sample 1", pixels).ids == reqs[1].ids  # and the same on every call
    n = 7 * 256
    for r in reqs:
        assert r.ids[r.image_start : r.image_start + n] == [ids.image] * n
        assert r.ids.count(ids.image) == n  # no stray placeholder in the text (the peer counts them all)
        assert r.ids[r.image_start - 1] == ids.img_start and r.ids[r.image_start + n] == ids.img_end
        assert r.instruction == (r.image_start + n + 1, r.image_start + n + 21) and r.ids[0] == ids.bos
        assert r.ignore_eos and r.max_new_tokens == 4 and r.has_thumbnail


def test_random_weights_are_built_in_place_with_tied_embeddings() -> None:
    cfg = tiny_config(64)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_word_embeddings=True))
    model = build_model(cfg, random_state_dict(cfg, seed=0, dtype=torch.bfloat16))
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
# The command (the installed console script, in a subprocess)


def ptp(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")}
    if home is not None:
        env["PTP_HOME"] = str(home)
    return subprocess.run([str(PTP), *args], capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)


def test_cli_says_what_it_runs_and_prints_plain_columns(tmp_path: Path, ptp_home: Path) -> None:
    out = tmp_path / "bench.json"
    proc = ptp("bench", "--model", "tiny", "--image-size", "448x448", "--max-tiles", "1", "--batch-size", "2",
               "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--methods", "ptp", "--ratios", "0.5",
               "--no-peer", "--targets", "--json", str(out), home=ptp_home)  # the peer is covered in-process above
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    for fact in ("tiny", "random weights", "float32", "cpu", "batch 2", "1 tile and", "FLOP", "1 round of 3 timed"):
        assert fact in first, first
    assert "warm-up" not in proc.stderr
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["none", "ptp@0.5"]
    assert data["rows"][1]["speedup_vs_peer"] is None and data["peer_tokens_match"] is None
    blocks = proc.stdout.split("\n\n")
    assert "machine load (1-min average)" in blocks[0] and "before the rows" in blocks[0]
    warning, *table = blocks[1].splitlines()
    assert warning.startswith("warning: speedups below come from one timed round") and "--repeats N" in warning
    names, units = table[0], table[1]  # a plain name, then its unit
    for plain in ("samples/s", "speedup vs", "first token", "visual tokens", "FLOPs", "peak memory"):
        assert plain in names
    for unit in ("ms", "per sample", "FLOP/s", "GiB, CPU peak RSS", "layer mean", "last layer"):
        assert unit in units
    assert data["rows"][0]["peak_memory_bytes"] > 0 and not table[-1].rstrip().endswith(" -")
    for jargon in ("% mm", "TFLOP/smp", "vs peer", "smp"):
        assert jargon not in proc.stdout
    cells = [c for line in table[3:] for c in line.split()]
    assert not [c for c in cells if re.fullmatch(r"0\.0*", c)], table  # nothing measured rounds to zero
    assert "Performance targets" in proc.stdout and "not applicable" in proc.stdout


def test_cli_refuses_a_full_size_model_on_cpu() -> None:
    proc = ptp("bench", "--shape", "internvl2-2b", "--device", "cpu")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptp: error: ")
    assert "--model tiny" in lines[0] and "--force" in lines[0] and "full-size" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--shape", "internvl2-3b"], "--shape: unknown shape 'internvl2-3b'"),
     (["--image-size", "12by3"], "--image-size must be WIDTHxHEIGHT")],
)
def test_cli_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    proc = ptp("bench", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptp: error: ") and message in lines[0]
