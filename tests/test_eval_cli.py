"""``ptp eval`` end to end: the real command in a subprocess, on real files; the grid with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

TIMEOUT = 300


def ptp(*args: str | Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")} | ({"PTP_HOME": str(home)} if home else {})
    argv = [sys.executable, "-m", "ptp_cli.cli.main", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptp: error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Scoring existing predictions (no model)


@pytest.fixture
def gold(tmp_path: Path) -> Path:
    return jsonl(tmp_path / "gold.jsonl", [
        {"id": "q1", "image": "a.png", "question": "?", "answer": "Two", "type": "count"},
        {"id": "q2", "image": "a.png", "question": "?", "answer": "red", "type": "colour"},
        {"id": "q3", "image": "a.png", "question": "?", "answer": "blue", "type": "colour"},
        {"id": "q4", "image": "a.png", "question": "?", "answer": "4", "type": "count"},
    ])


def test_predictions_are_scored_with_errors_and_missing_counted(tmp_path: Path, gold: Path) -> None:
    none = jsonl(tmp_path / "none.jsonl", [
        {"id": f"q{i}", "line": i, "answer": a, "settings": {"method": "none"},
         "tokens": {"visual_before": 512, "visual_after": 512}, "flops": {"total": 2e12},
         "timing": {"vit": 0.5, "probe": 0.0, "prefill": 0.3, "decode": 0.2, "batch": 2}}
        for i, a in enumerate(["2", "Red.", "blue", "four"], start=1)
    ])
    ptp_rows = [
        {"id": "q1", "line": 1, "answer": "two", "settings": {"method": "ptp", "ratio": 0.5},
         "tokens": {"visual_before": 512, "visual_after": 256}},
        {"id": "q2", "line": 2, "answer": "green", "settings": {"method": "ptp", "ratio": 0.5},
         "tokens": {"visual_before": 512, "visual_after": 256}},
        {"id": "q3", "line": 3, "error": {"type": "image_error", "message": "image not found"}},
        # q4 has no row; this one belongs to no gold record
        {"id": "q9", "line": 9, "answer": "4", "settings": {"method": "ptp", "ratio": 0.5}},
    ]
    pruned = jsonl(tmp_path / "ptp.jsonl", ptp_rows)
    report = tmp_path / "report.json"
    proc = ptp("eval", gold, "--predictions", none, "--predictions", pruned, "--by", "type", "--json", report)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(report.read_text())["runs"]
    base, run = runs
    assert (base["name"], base["method"], base["ratio"], base["n"], base["n_errors"]) == ("none", "none", None, 4, 0)
    assert base["scores"] == {"exact": 1.0} and base["retention"] == 1.0
    assert base["visual_tokens"] == 512 and base["tflops"] == 2.0
    assert base["samples_per_s"] == pytest.approx(4 / (4 * 1.0 / 2))  # each row's share: 1 s batch / 2
    assert (run["method"], run["ratio"], run["n"], run["n_errors"], run["n_missing"], run["n_unmatched"]) == \
        ("ptp", 0.5, 4, 2, 1, 1)
    assert run["scores"] == {"exact": 0.25} and run["retention"] == 0.25  # q1 right; q2 wrong; q3, q4 zero
    assert run["visual_tokens"] == 256
    assert run["groups"]["count"] == {"n": 2, "n_errors": 1, "scores": {"exact": 0.5}, "retention": 0.5}
    assert run["groups"]["colour"]["scores"] == {"exact": 0.0}
    assert "1 gold records have no prediction" in proc.stderr and "1 prediction rows match no gold" in proc.stderr
    title, blank, *table = proc.stdout.splitlines()  # the title: model (unknown: rows without settings), n, gold
    assert title.startswith("model unknown, n = 4, ") and title.endswith("gold.jsonl") and blank == ""
    assert table[0].startswith("| run | method | ratio | n | errors | exact | retention |")
    assert table[3].startswith("| ptp | ptp | 0.5 | 4 | 2 | 25.0 | 25.0 |")
    assert "type = colour" in proc.stdout and "type = count" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--predictions", "P", "--model", "tiny"], "--model runs a model; it does not go with --predictions"),
    (["--predictions", "P", "--ratios", "0.5"], "--ratios runs a model"),
    (["--predictions", "P", "--by", "nope"], "--by nope: no gold record has a field 'nope'"),
    (["--predictions", "P", "--metric", "bleu"], "--metric: unknown metric 'bleu'"),
    (["--predictions", "P", "--json", "."], "--json . is a directory"),
    (["--model", "tiny"], "running models needs --out-dir DIR"),
    (["--model", "tiny", "--out-dir", "o", "--methods", "none,fancy"], "--methods: unknown method 'fancy'"),
    (["--model", "tiny", "--out-dir", "o", "--ratios", "1.5"], "--ratios must be comma-separated numbers"),
])
def test_usage_errors_are_one_line(tmp_path: Path, gold: Path, args: list[str], message: str) -> None:
    pred = jsonl(tmp_path / "p.jsonl", [{"id": "q1", "line": 1, "answer": "2"}])
    args = [str(pred) if a == "P" else str(tmp_path / a) if a == "o" else a for a in args]
    assert message in one_error_line(ptp("eval", gold, *args))


def test_a_bad_gold_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "gold.jsonl"
    bad.write_text('{"answer": "x"}\n\n{"question": "no answer"}\n')
    line = one_error_line(ptp("eval", bad, "--predictions", jsonl(tmp_path / "p.jsonl", [])))
    assert f"gold file {bad}, line 3: no gold answer" in line


# ---------------------------------------------------------------------------------------------------------
# The grid with the tiny model


def test_grid_with_the_tiny_model_scores_every_run_and_resumes(tmp_path: Path, ptp_home: Path) -> None:
    rng = np.random.default_rng(0)
    for name, size in (("wide.png", (320, 200)), ("tall.png", (200, 320))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    gold = jsonl(tmp_path / "gold.jsonl", [
        {"id": "yn", "image": "wide.png", "question": "Is it noisy?", "answer": "yes"},
        {"id": "vqa", "image": "tall.png", "question": "What colour?", "answers": ["red", "red", "grey"]},
        {"id": "mc", "image": "wide.png", "question": "Which?", "answer": "A", "choices": ["noise", "cat"]},
    ])
    out, report, plot = tmp_path / "runs", tmp_path / "report.json", tmp_path / "plot.png"
    args = ("eval", gold, "--model", "tiny", "--methods", "ptp,none,random", "--ratios", "0.5",
            "--max-new-tokens", "2", "--max-tiles", "1", "--batch-size", "3", "--out-dir", out,
            "--json", report, "--plot", plot)
    proc = ptp(*args, home=ptp_home)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert list(runs) == ["none", "ptp@0.5", "random@0.5"]  # the baseline first
    assert runs["none"]["retention"] == 1.0 or runs["none"]["retention"] is None  # None: the baseline scored 0
    for name, run in runs.items():
        assert set(run) >= {"method", "ratio", "n", "scores", "retention", "visual_tokens", "tflops",
                            "samples_per_s", "groups"}
        assert (run["n"], run["n_errors"], run["n_missing"]) == (3, 0, 0), name
        assert set(run["scores"]) == {"vqa", "mc", "yesno", "yesno_precision", "yesno_recall", "yesno_f1",
                                      "yesno_yes_ratio"}
        assert all(0.0 <= v <= 1.0 for v in run["scores"].values())
        rows = read_rows(out / f"{name}.jsonl")
        assert sorted(r["line"] for r in rows) == [1, 2, 3] and all("answer" in r for r in rows)
    assert (runs["none"]["method"], runs["none"]["ratio"], runs["ptp@0.5"]["ratio"]) == ("none", None, 0.5)
    assert runs["none"]["visual_tokens"] == 256 and runs["ptp@0.5"]["visual_tokens"] == 128
    assert runs["ptp@0.5"]["tflops"] < runs["none"]["tflops"]
    with Image.open(plot) as img:
        assert img.format == "PNG"

    # Interrupted: the random run's file lost its last rows, and a half-written line was left behind.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    first = before["random@0.5.jsonl"].splitlines(keepends=True)[0]
    (out / "random@0.5.jsonl").write_bytes(first + b'{"id": "vq')
    again = ptp(*args, home=ptp_home)
    assert again.returncode == 0, again.stderr
    assert "none: done (3 records" in again.stderr and "random@0.5: 2 of 3 records to run" in again.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["none.jsonl"] == before["none.jsonl"] and after["ptp@0.5.jsonl"] == before["ptp@0.5.jsonl"]
    rows = read_rows(out / "random@0.5.jsonl")
    assert [r["line"] for r in rows] == [1, 2, 3] and after["random@0.5.jsonl"].startswith(first)
    assert json.loads(report.read_text())["runs"][2]["n"] == 3


@pytest.mark.slow  # in CI's own step (.ci/run): keeps the default run under 10 minutes on 2 cores
@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is POSIX flock")
def test_two_grids_sharing_an_output_folder_never_write_a_run_twice(tmp_path: Path, ptp_home: Path) -> None:
    """While another process holds a run's lock, a grid waits for it, then finds the rows there: no run's
    rows are appended twice (two parallel grids over one folder used to write the shared ``none`` run twice)."""
    import fcntl

    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (200, 320, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    gold = jsonl(tmp_path / "gold.jsonl", [
        {"id": str(i), "image": "wide.png", "question": q, "answer": "yes"} for i, q in enumerate(("Noisy?", "Red?"))
    ])
    out = tmp_path / "runs"
    args = ("eval", gold, "--model", "tiny", "--methods", "none", "--max-new-tokens", "1", "--max-tiles", "1",
            "--out-dir", out)
    first = ptp(*args, home=ptp_home)  # what the other process would have written
    assert first.returncode == 0, first.stderr
    written = (out / "none.jsonl").read_bytes()
    (out / "none.jsonl").write_bytes(b"")  # the other process has only begun
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")} | {"PTP_HOME": str(ptp_home)}
    with (out / "none.jsonl.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, "-m", "ptp_cli.cli.main", *map(str, args)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert second.stderr is not None
        lines = []
        for line in second.stderr:  # it must say that it waits, and then wait
            lines.append(line)
            if "waiting for another process" in line:
                break
        assert any("none: waiting for another process" in line for line in lines), lines
        assert second.poll() is None and (out / "none.jsonl").read_bytes() == b""
        (out / "none.jsonl").write_bytes(written)  # the other process finishes its rows, then lets go
        fcntl.flock(held, fcntl.LOCK_UN)
        rest = second.communicate(timeout=TIMEOUT)[1]
    assert second.returncode == 0, rest
    assert "none: done (2 records" in rest
    assert (out / "none.jsonl").read_bytes() == written


def test_grid_alphas_and_ablations_add_ptp_variants(tmp_path: Path, ptp_home: Path) -> None:
    """--alphas and --ablations run PTP beside the grid at each ratio, each variant with its own settings."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (200, 320, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    gold = jsonl(tmp_path / "gold.jsonl", [
        {"id": i, "image": "wide.png", "question": q, "answer": "yes"} for i, q in enumerate(("Noisy?", "Any red?"))
    ])
    out, report = tmp_path / "runs", tmp_path / "report.json"
    proc = ptp("eval", gold, "--model", "tiny", "--methods", "none", "--ratios", "0.5,0.75", "--alphas", "0,auto",
               "--ablations", "--max-new-tokens", "1", "--max-tiles", "1", "--out-dir", out, "--json", report,
               home=ptp_home)
    assert proc.returncode == 0, proc.stderr
    names = [r["name"] for r in json.loads(report.read_text())["runs"]]
    assert names == ["none", "ptp@0.5,alpha=0", "ptp@0.5,alpha=auto", "ptp@0.75,alpha=0", "ptp@0.75,alpha=auto",
                     "ptp@0.5,uniform", "ptp@0.75,uniform"]
    for name in names[1:]:
        settings = read_rows(out / f"{name}.jsonl")[0]["settings"]
        ratio, variant = name.removeprefix("ptp@").split(",")
        assert settings["method"] == "ptp" and settings["ratio"] == float(ratio)
        assert settings["alpha"] == {"alpha=0": 0.0, "alpha=auto": "auto", "uniform": 0.5}[variant]
        assert settings["region_budgets"] is (variant != "uniform")
    bad = ptp("eval", gold, "--model", "tiny", "--alphas", "0,2", "--out-dir", out, home=ptp_home)
    assert bad.returncode == 2 and "--alphas" in one_error_line(bad)
