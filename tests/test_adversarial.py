"""An adversarial input file runs to the end within a memory budget: one row per record, in order, exit 3.

The file mixes good records with everything that has taken a run down before: bad JSON, unreadable images, a
decompression bomb, a question of 20,000 characters (thousands of tokens: the instruction probe once needed
memory quadratic in its length) and one of 100,000 (more tokens than the model's positions: refused before any
compute). The real command runs in a subprocess, its peak RSS measured by a parent of its own; then a run killed
with SIGKILL and resumed must give the same rows as the run that was not.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from test_cli import TIMEOUT, _argv, _env, bomb_png, parse_rows, popen, wait_for_lines, write_jsonl

RSS_BUDGET_MB = 4096  # the tiny model's whole process, long questions included
ARGS = ["--model", "tiny", "--max-new-tokens", "3", "--max-tiles", "2", "--batch-size", "4"]
# A measuring parent: runs the command as its only child, then prints that child's peak RSS (KiB on Linux).
MEASURE = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def _question(chars: int) -> str:
    return ("What colour is the square in the picture? " * (chars // 40 + 1))[:chars]


def adversarial_file(tmp: Path) -> tuple[Path, list[Any]]:
    Image.new("RGB", (700, 400), (30, 90, 160)).save(tmp / "ok.png")
    Image.new("RGB", (200, 200), (200, 30, 30)).save(tmp / "red.png")
    full = (tmp / "ok.png").read_bytes()
    (tmp / "trunc.png").write_bytes(full[: len(full) // 3])
    (tmp / "empty.png").write_bytes(b"")
    bomb_png(tmp / "bomb.png")
    q = "What is in the picture?"
    lines: list[Any] = [
        *({"id": f"ok{i}", "image": "ok.png" if i % 2 else "red.png", "question": f"{q} ({i})"} for i in range(6)),
        "{not json",
        {"id": "missing", "image": "nope.png", "question": q},
        {"id": "trunc", "image": "trunc.png", "question": q},
        {"id": "empty", "image": "empty.png", "question": q},
        {"id": "bomb", "image": "bomb.png", "question": q},
        {"id": "noq", "image": "ok.png"},
        {"id": "blankq", "image": "ok.png", "question": "   "},
        *({"id": f"mid{i}", "image": "ok.png", "question": q} for i in range(4)),
        {"id": "long", "image": "ok.png", "question": _question(20_000)},
        {"id": "huge", "image": "red.png", "question": _question(100_000)},
        "[1, 2]",
        *({"id": f"end{i}", "image": "red.png", "question": q} for i in range(6)),
    ]
    assert len(lines) == 26
    return write_jsonl(tmp / "in.jsonl", lines), lines


def test_adversarial_file_runs_to_the_end_within_memory_and_resumes_exactly(tmp_path: Path, ptp_home: Path) -> None:
    _, lines = adversarial_file(tmp_path)
    measured = subprocess.run(
        [sys.executable, "-c", MEASURE, *_argv("infer", "in.jsonl", *ARGS, "-o", "whole.jsonl")],
        capture_output=True, env=_env(ptp_home), cwd=tmp_path, timeout=TIMEOUT * 2, check=False,
    )
    stderr = measured.stderr.decode()
    assert measured.returncode == 3, stderr  # some records failed, each with its row; the run went on
    peak_mb = int(stderr.strip().splitlines()[-1]) / 1024
    assert peak_mb < RSS_BUDGET_MB, f"peak RSS {peak_mb:.0f} MB"
    whole = parse_rows((tmp_path / "whole.jsonl").read_bytes())
    assert [r["line"] for r in whole] == list(range(1, 27))  # one row per record, in input order
    by_id = {r["id"]: r for r in whole}
    assert "error" not in by_id["long"] and by_id["long"]["tokens"]["prompt"] > 5000  # answered, not refused
    huge = by_id["huge"]["error"]
    assert huge["type"] == "prompt_too_long" and huge["prompt_tokens"] > huge["limit"] == 32768
    errors = {r["id"]: r["error"]["type"] for r in whole if "error" in r}
    assert errors == {
        7: "invalid_record", "missing": "image_error", "trunc": "image_error", "empty": "image_error",
        "bomb": "image_error", "noq": "invalid_record", "blankq": "invalid_record", "huge": "prompt_too_long",
        20: "invalid_record",
    }

    # Killed with SIGKILL after a few rows, then resumed: the same rows, each record once, in order.
    args = ["infer", "in.jsonl", *ARGS, "-o", "out.jsonl", "--resume"]
    proc = popen(*args, home=ptp_home, cwd=tmp_path)
    wait_for_lines(tmp_path / "out.jsonl", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    resumed = subprocess.run(_argv(*args), capture_output=True, env=_env(ptp_home), cwd=tmp_path,
                             timeout=TIMEOUT * 2, check=False)
    assert resumed.returncode == 3, resumed.stderr.decode()
    rows = parse_rows((tmp_path / "out.jsonl").read_bytes())

    def essence(r: dict[str, Any]) -> tuple:
        return r["line"], r["id"], r.get("answer"), json.dumps(r.get("error"), sort_keys=True)

    assert [essence(r) for r in rows] == [essence(r) for r in whole]
    assert len(lines) == len(rows)

