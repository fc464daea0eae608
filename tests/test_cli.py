"""``ptp infer`` end to end: the real command, in a subprocess, on real files, with the tiny model."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

FAST = ["--model", "tiny", "--max-new-tokens", "4", "--max-tiles", "2"]
SLOW_ROWS = ["--model", "tiny", "--max-new-tokens", "4", "--max-tiles", "1", "--batch-size", "1"]
TIMEOUT = 180


def _env(home: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")}
    if home is not None:
        env["PTP_HOME"] = str(home)
    return env | (extra or {})


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ptp_cli.cli.main", *args]


def ptp(
    *args: str, home: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(_argv(*args), capture_output=True, env=_env(home, env), cwd=cwd, input=stdin,
                          timeout=TIMEOUT, check=False)


def popen(
    *args: str, home: Path, env: dict[str, str] | None = None, cwd: Path | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_argv(*args), env=_env(home, env), cwd=cwd, stderr=subprocess.PIPE, **kwargs)


def parse_rows(data: bytes) -> list[dict[str, Any]]:
    """Every line must be one JSON object: stdout and --output carry nothing else."""
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def write_jsonl(path: Path, records: list[dict[str, Any] | str | bytes]) -> Path:
    with path.open("wb") as f:
        for r in records:
            raw = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            f.write(raw + b"\n")
    return path


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, f"ptp ended before writing {n} rows: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def error_line(stderr: bytes, *, alone: bool = True) -> str:
    """The one ``ptp: error:`` line, last on stderr (``alone``: the only line), and no traceback."""
    text = stderr.decode()
    lines = text.splitlines()
    assert "Traceback" not in text and lines, text
    assert lines[-1].startswith("ptp: error: ") and sum(ln.startswith("ptp: error:") for ln in lines) == 1, text
    assert len(lines) == 1 or not alone, text
    return lines[-1]


def bomb_png(path: Path) -> None:
    """A 1x1 PNG whose header claims 30000x30000 pixels (CRC fixed up): refused from the header."""
    Image.new("RGB", (1, 1)).save(path)
    png = bytearray(path.read_bytes())
    ihdr = b"IHDR" + struct.pack(">II", 30000, 30000) + bytes(png[24:29])
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(png))


@pytest.fixture
def image(tmp_path: Path) -> str:
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "img.png")
    return "img.png"


def records(n: int, image: str) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "image": image, "question": f"What is {i}?"} for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Help, version, usage errors


def test_version_and_help() -> None:
    version = ptp("--version")
    assert version.returncode == 0 and version.stdout.decode().startswith("ptp ")
    help_ = ptp("infer", "--help", env={"COLUMNS": "200"})
    assert help_.returncode == 0
    for option in ("--model", "--method", "--ratio", "--alpha", "--preset", "--vit-layer", "--llm-layer",
                   "--max-tiles", "--min-tiles", "--batch-size", "--max-batch-tokens", "--max-new-tokens",
                   "--temperature", "--seed", "--dtype", "--device", "--output", "--resume", "--force-resume",
                   "--retry-errors", "--shard", "--logprobs", "--quiet", "--config", "--workers"):
        assert option in help_.stdout.decode(), option


@pytest.mark.parametrize(
    ("args", "env", "config", "message"),
    [
        (["--resume"], {}, None, "--resume needs --output"),
        (["--shard", "2/2"], {}, None, "--shard 2/2"),
        (["--retry-errors", "-o", "out.jsonl"], {}, None, "only apply with --resume"),
        (["-o", "in.jsonl"], {}, None, "is the input file"),
        ([], {"PTP_RATIO": "abc"}, None, "invalid value for '--ratio': Input should be a valid number, unable to parse string as a number (from PTP_RATIO=abc)"),
        ([], {"PTP_RESUME": "maybe"}, None, "invalid value for '--resume': Input should be a valid boolean, unable to interpret input (from PTP_RESUME=maybe)"),
        ([], {}, "ratio: 0.5\nrato: 0.3\n", "unknown key 'rato'"),
        ([], {}, "max-new-tokens: lots\n", "--max-new-tokens must be an integer"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    tmp_path: Path, image: str, args: list[str], env: dict[str, str], config: str | None, message: str
) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(1, image))
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        args = [*args, "--config", "c.yaml"]
    result = ptp("infer", "in.jsonl", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert message in error_line(result.stderr)
    assert result.stdout == b""


def test_typer_usage_errors_exit_2(tmp_path: Path) -> None:
    assert ptp("infer", "x.jsonl", "--ratio", "abc").returncode == 2
    assert ptp("infer", "x.jsonl", "--no-such-option").returncode == 2
    missing = ptp("infer", "missing.jsonl", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read input missing.jsonl" in error_line(missing.stderr)


def test_errors_found_with_the_model_loaded(tmp_path: Path, ptp_home: Path, image: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(1, image))
    (tmp_path / "c.yaml").write_text("llm-layer: 9\n")
    cases = [  # (extra args, environment, exit code, message); run side by side to save time
        ([], {"PTP_RATIO": "1.5"}, 2, "--ratio must be in [0, 1), got 1.5 (from PTP_RATIO=1.5)"),
        (["--config", "c.yaml"], {}, 2, "--llm-layer must be in [0, 3] for this model, got 9 (from c.yaml)"),
        (["--model", "/nonexistent/checkpoint"], {}, 1, "neither an existing directory"),
    ]
    procs = [popen("infer", "in.jsonl", *FAST, *args, home=ptp_home, env=env, cwd=tmp_path, stdout=subprocess.PIPE)
             for args, env, _, _ in cases]
    for proc, (_, _, code, message) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == code and out == b""
        assert message in error_line(err)


def test_unexpected_errors_give_one_line_and_a_debug_hint(
    tmp_path: Path, image: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ptp_cli.cli import main as cli_main

    def boom(text: str) -> tuple[int, int]:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("ptp_cli.cli.infer.parse_shard", boom)  # the library call, where the CLI imported it
    monkeypatch.setattr(sys, "argv", ["ptp", "infer", str(write_jsonl(tmp_path / "in.jsonl", [])), "--shard", "0/2"])
    monkeypatch.delenv("PTP_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err == "ptp: error: unexpected RuntimeError: disk on fire second line (set PTP_DEBUG=1 for the traceback)\n"

    monkeypatch.setenv("PTP_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 1
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Bad records


def test_bad_records_never_stop_the_run_and_are_never_dropped(tmp_path: Path, ptp_home: Path) -> None:
    Image.new("RGB", (300, 200), (50, 60, 70)).save(tmp_path / "ok.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    Image.new("RGB", (2000, 3), (9, 9, 9)).save(tmp_path / "wide.png")
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    bomb_png(tmp_path / "bomb.png")
    q = "What is this?"
    lines: list[dict[str, Any] | str | bytes] = [
        {"id": "ok", "image": "ok.png", "question": q},
        # More bad lines than the reorder window (batch 1, 1 worker) right behind a slow record.
        *["{not json"] * 10,
        b'{"id": "latin1", "image": "one.png", "question": "caf\xe9"}',
        {"id": "noq", "image": "one.png"},
        {"id": "emptyq", "image": "one.png", "question": "   "},
        {"id": "missing", "image": "nope.png", "question": q},
        {"id": "dir", "image": "adir", "question": q},
        {"id": "trunc", "image": "trunc.png", "question": q},
        {"id": "empty", "image": "empty.png", "question": q},
        {"id": "bomb", "image": "bomb.png", "question": q},
        "",  # blank: no row
        {"id": "one", "image": "one.png", "question": q},
        {"id": "wide", "image": "wide.png", "question": q},
        {"id": "dup", "image": "one.png", "question": q},
        {"id": "dup", "image": "one.png", "question": "Again?"},
        "[1, 2]",
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    result = ptp("infer", "in.jsonl", *FAST, "--batch-size", "1", "--workers", "1", home=ptp_home, cwd=tmp_path)
    assert result.returncode == 3, result.stderr.decode()
    rows = parse_rows(result.stdout)
    expected_lines = [n for n, r in enumerate(lines, start=1) if r != ""]
    assert [r["line"] for r in rows] == expected_lines  # one row per record, in input order

    by_id = {r["id"]: r for r in rows}
    errors = {r["id"]: r["error"]["type"] for r in rows if "error" in r}
    assert errors == {
        **{n: "invalid_record" for n in range(2, 13)},  # bad JSON, and not UTF-8: the id is the line number
        "noq": "invalid_record", "emptyq": "invalid_record",
        "missing": "image_error", "dir": "image_error", "trunc": "image_error", "empty": "image_error",
        "bomb": "image_error", len(lines): "invalid_record",
    }
    assert "UTF-8" in by_id[12]["error"]["message"] and "too large" in by_id["bomb"]["error"]["message"]
    for ok in ("ok", "one", "wide"):
        assert by_id[ok]["tokens"]["generated"] >= 1 and "error" not in by_id[ok]
    assert [r["id"] for r in rows].count("dup") == 2  # duplicate ids: both processed, both kept
    stderr = result.stderr.decode()
    assert all(line.startswith("ptp: ") for line in stderr.splitlines()), stderr  # no progress bar off a terminal
    assert "5 ok, 19 failed" in stderr and "samples/s" in stderr and "visual tokens kept" in stderr
    loaded = [line for line in stderr.splitlines() if "random weights" in line]  # said once, where it loads
    assert len(loaded) == 1 and loaded[0].startswith("ptp: loaded tiny") and "answers are noise" in loaded[0]


# ---------------------------------------------------------------------------------------------------------
# Precedence, --quiet, stdout


def test_precedence_cli_over_env_over_yaml_over_preset_and_quiet(tmp_path: Path, ptp_home: Path, image: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(2, image))
    (tmp_path / "c.yaml").write_text("preset: ocr\nratio: 0.9\nalpha: 0.1\nllm_layer: 2\nmax-new-tokens: 3\n")
    env = {"PTP_RATIO": "0.75", "PTP_ALPHA": "0.3", "PTP_MODEL": "tiny", "PTP_MAX_TILES": "2"}
    result = ptp("infer", "in.jsonl", "--config", "c.yaml", "--ratio", "0.25", "--quiet",
                 home=ptp_home, env=env, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == b""  # --quiet: nothing on stderr on success
    rows = parse_rows(result.stdout)
    assert [r["id"] for r in rows] == ["r0", "r1"]
    settings = rows[0]["settings"]
    assert settings["ratio"] == 0.25  # command line beats PTP_RATIO and the YAML
    assert settings["alpha"] == 0.3  # PTP_ALPHA beats the YAML
    assert settings["llm_layer"] == 2  # the YAML beats the default
    assert settings["vit_layer"] == 2  # the preset (ocr, from the YAML) beats the default 11
    assert settings["max_new_tokens"] == 3 and settings["model"] == "tiny" and settings["max_tiles"] == 2


# ---------------------------------------------------------------------------------------------------------
# Resume


def test_resume_after_sigkill_and_torn_line_then_settings_check(tmp_path: Path, ptp_home: Path, image: str) -> None:
    n = 12
    inp = write_jsonl(tmp_path / "in.jsonl", records(n, image))
    out = tmp_path / "out.jsonl"
    args = ["infer", "in.jsonl", *SLOW_ROWS, "-o", "out.jsonl", "--resume"]

    proc = popen(*args, home=ptp_home, cwd=tmp_path)
    wait_for_lines(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    done = out.read_bytes()
    assert done.count(b"\n") < n, "the run finished before the kill; the test needs more records"
    kept = done[: done.rfind(b"\n") + 1]
    with out.open("ab") as f:
        f.write(b'{"id": "r99", "li')  # a torn last line, as a kill mid-write leaves it

    resumed = ptp(*args, home=ptp_home, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert "torn" in resumed.stderr.decode()
    final = out.read_bytes()
    assert final.startswith(kept)  # rows already there are kept as they were, not redone
    assert [r["line"] for r in parse_rows(final)] == list(range(1, n + 1))  # every record exactly once

    other = ptp(*args, "--ratio", "0.25", home=ptp_home, cwd=tmp_path)
    assert other.returncode == 2
    assert "--force-resume" in error_line(other.stderr, alone=False)
    assert out.read_bytes() == final

    write_jsonl(inp, [*records(n, image), *records(2, image)])
    forced = ptp(*args, "--ratio", "0.25", "--force-resume", home=ptp_home, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr.decode()
    rows = parse_rows(out.read_bytes())
    assert [r["line"] for r in rows] == list(range(1, n + 3))
    assert [r["settings"]["ratio"] for r in rows[n:]] == [0.25, 0.25]


# ---------------------------------------------------------------------------------------------------------
# Shards


def test_shards_together_cover_every_record_once(tmp_path: Path, ptp_home: Path, image: str) -> None:
    lines: list[dict[str, Any] | str | bytes] = [*records(5, image), "", "{bad", *records(2, image)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    # Shard 0 reads a file, shard 1 stdin (relative image paths then resolve against the working directory).
    p0 = popen("infer", "in.jsonl", *FAST, "--shard", "0/2", home=ptp_home, cwd=tmp_path, stdout=subprocess.PIPE)
    p1 = popen("infer", "-", *FAST, "--shard", "1/2", home=ptp_home, cwd=tmp_path,
               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out1, _ = p1.communicate(inp.read_bytes(), timeout=TIMEOUT)
    out0, _ = p0.communicate(timeout=TIMEOUT)
    assert p0.returncode == 0 and p1.returncode == 3  # the bad line (the 6th non-blank line) is shard 1's
    got0, got1 = [r["line"] for r in parse_rows(out0)], [r["line"] for r in parse_rows(out1)]
    assert not set(got0) & set(got1)
    assert sorted(got0 + got1) == [n for n, r in enumerate(lines, start=1) if r != ""]


# ---------------------------------------------------------------------------------------------------------
# Signals and pipes


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: a test suite launched with
    # `&` (nohup, some CI runners) would hand ptp an uninterruptible run. Ctrl-C at a terminal is the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_flushes_what_is_done_and_exits_130(tmp_path: Path, ptp_home: Path, image: str) -> None:
    n = 30
    write_jsonl(tmp_path / "in.jsonl", records(n, image))
    out = tmp_path / "out.jsonl"
    proc = popen("infer", "in.jsonl", *SLOW_ROWS, "-o", "out.jsonl", home=ptp_home, cwd=tmp_path,
                 preexec_fn=_default_sigint)
    wait_for_lines(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err.decode()
    assert "Traceback" not in err.decode() and "interrupted" in err.decode()
    data = out.read_bytes()
    assert data.endswith(b"\n")  # whole rows only
    got = [r["line"] for r in parse_rows(data)]
    assert 2 <= len(got) < n and got == list(range(1, len(got) + 1))  # a prefix, in order


def test_closed_pipe_ends_quietly(tmp_path: Path, ptp_home: Path, image: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", records(12, image))
    proc = popen("infer", "in.jsonl", *SLOW_ROWS, home=ptp_home, cwd=tmp_path, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # like `ptp infer ... | head -1`
    proc.stdout.close()
    _, err = proc.communicate(timeout=TIMEOUT)
    assert json.loads(first)["id"] == "r0"
    assert proc.returncode == 141  # as if killed by SIGPIPE, like other tools in a pipeline
    assert b"BrokenPipe" not in err and b"Traceback" not in err and b"Exception ignored" not in err
