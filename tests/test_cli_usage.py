"""The command line as a new user meets it: the real ``ptp`` console script, in a subprocess, on real files.

Fast failures (before torch, before weights), one-line usage errors, help, ``ptp methods``, ``--check``,
``--image-root`` and the ``--resume`` refusal that names what changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_cli import error_line, records, write_jsonl

from ptp_cli.io.resume import scan_output

PTP = str(Path(sys.executable).with_name("ptp"))  # the console script pip installed next to this python
TIMEOUT = 180
TINY = ["--model", "tiny", "--max-new-tokens", "2", "--max-tiles", "1"]


def _env(home: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTP_")} | {"COLUMNS": "120"}
    if home is not None:
        env["PTP_HOME"] = str(home)
    return env | (extra or {})


def run(*args: str, cwd: Path | None = None, home: Path | None = None, env: dict[str, str] | None = None,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PTP, *args], capture_output=True, cwd=cwd, env=_env(home, env), input=stdin,
                          timeout=TIMEOUT, check=False)


def start(*args: str, cwd: Path | None = None, home: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``ptp`` (so that several run side by side); ``finish`` feeds its stdin and collects it."""
    return subprocess.Popen([PTP, *args], cwd=cwd, env=_env(home), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(stdin, timeout=TIMEOUT)
    return proc.returncode, out, err


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture
def question_file(tmp_path: Path) -> Path:
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "img.png")
    return write_jsonl(tmp_path / "q.jsonl", records(1, "img.png"))


@pytest.fixture
def config_only(tmp_path: Path, ptp_home: Path) -> Path:
    """A copy of the tiny checkpoint without its weights: only a run that never loads weights can use it."""
    from ptp_cli.builders.tiny import ensure_tiny

    target = tmp_path / "no-weights"
    shutil.copytree(ensure_tiny(cache_dir=ptp_home / "models"), target)
    for weights in target.glob("*.safetensors*"):
        weights.unlink()
    return target


# ---------------------------------------------------------------------------------------------------------
# Usage errors: one line, exit 2, on every command


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["infer", "q.jsonl", "--rato", "0.3"], "--ratio"),  # the "did you mean" hint survives
        (["infer", "q.jsonl", "--ratio", "abc"], "'--ratio'"),
        (["infer"], "INPUT"),
        (["infer", "q.jsonl", "--resume", "true"], "unexpected extra argument"),  # a flag takes no value
        (["bench", "--batch-size", "many"], "'--batch-size'"),
        (["bench", "--no-such-option"], "--no-such-option"),
        (["methods", "--jsn"], "--json"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_usage_errors_are_one_stderr_line_and_exit_2(question_file: Path, args: list[str], fragment: str) -> None:
    result = run(*args, cwd=question_file.parent)
    assert result.returncode == 2, result.stderr.decode()
    assert result.stdout == b""
    line = error_line(result.stderr)  # the only line on stderr, no traceback, no box
    assert fragment in line and "(see 'ptp" in line


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--ratio", "1.5"], {}, "--ratio must be in [0, 1), got 1.5"),
        (["--alpha", "2"], {}, "--alpha must be in [0, 1]"),
        (["--max-new-tokens", "0"], {}, "--max-new-tokens must be at least 1"),
        ([], {"PTP_TAU": "0"}, "--tau must be > 0, got 0.0 (from PTP_TAU=0)"),
        (["--method", "bogus"], {}, "--method must be one of fastv, none, pdrop, pool, ptp, random, spatial, tiles, vtw"),
        (["--preset", "bogus"], {}, "--preset must be one of default, ocr, scene"),
        (["--head-agg", "median"], {}, "--head-agg must be one of mean, max"),
    ],
)
def test_bad_settings_fail_in_under_2_s_before_the_model_is_even_looked_for(
    question_file: Path, args: list[str], env: dict[str, str], fragment: str
) -> None:
    t0, cpu0 = time.perf_counter(), _children_cpu()
    result = run("infer", "q.jsonl", "--model", "/nonexistent/checkpoint", *args, cwd=question_file.parent, env=env)
    elapsed, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    assert result.returncode == 2, result.stderr.decode()  # not the model's error (exit 1)
    assert fragment in error_line(result.stderr)
    # On an idle machine the wall time is the CPU time; on this shared one it is not, so the CPU time is the
    # measure that cannot flake: importing torch alone costs more than 1 s of it.
    assert cpu < 1.0 and (elapsed < 2.0 or os.getloadavg()[0] > 2), f"{elapsed:.2f} s, {cpu:.2f} s of CPU"


def test_layer_indices_are_checked_from_the_config_alone(question_file: Path, ptp_home: Path,
                                                         config_only: Path) -> None:
    cases = [(["--vit-layer", "99"], "--vit-layer must be in [0, "), (["--method", "bogus"], "--method must be one of"),
             (["--method", "fastv", "--fastv-layer", "0"], "--fastv-layer must be in [1, ")]
    procs = [start("infer", "q.jsonl", "--model", str(config_only), *args, cwd=question_file.parent, home=ptp_home)
             for args, _ in cases]
    for proc, (_, fragment) in zip(procs, cases, strict=True):
        code, out, err = finish(proc)
        assert code == 2 and out == b"", err.decode()  # weights were never needed: there are none
        assert fragment in error_line(err)


# ---------------------------------------------------------------------------------------------------------
# Help and discovery


def test_help_is_h_plain_flags_and_one_default_style() -> None:
    procs = {name: start(*name.split(), "-h") for name in ("", "infer", "bench", "methods", "eval", "show", "synth")}
    texts = {}
    for name, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 0 and err == b"", err.decode()
        texts[name] = out.decode()
    infer = texts["infer"]
    assert "Usage: ptp infer [OPTIONS] INPUT" in infer and "{INPUT}" not in infer
    assert "<bool>" not in infer and "--resume / --no-resume" in infer and "--check / --no-check" in infer
    assert "--image-root" in infer and "[default: 0.5]" in infer and "(default:" not in infer
    assert "[default: 32]" in texts["bench"] and "(default:" not in texts["bench"]
    assert "--install-completion" in texts[""] and "methods" in texts[""]
    for name, text in texts.items():  # values named plainly (FILE, A,B,C, N), never Typer's <str>, <list[Path]>
        typed = [line for line in text.splitlines() if re.match(r"\s+(-|[A-Z]+\s).*<[a-zA-Z\[\]]+>", line)]
        assert not typed, (name, typed)
    assert "INPUT  JSONL file" in infer and "--predictions FILE" in texts["eval"] and "--methods A,B,C" in texts["bench"]
    assert "'mini'" in infer and "'tiny' (random weights" in infer
    bare = run()  # no command at all: the help, not an error
    assert bare.returncode == 0 and b"Commands:" in bare.stdout


def test_flags_can_be_turned_off_over_the_environment(question_file: Path) -> None:
    # PTP_RESUME=1 without --output is a usage error; --no-resume on the command line overrides it.
    on = run("infer", "q.jsonl", "--ratio", "1.5", cwd=question_file.parent, env={"PTP_RESUME": "1"})
    assert "--resume needs --output" in error_line(on.stderr)
    off = run("infer", "q.jsonl", "--no-resume", "--ratio", "1.5", cwd=question_file.parent, env={"PTP_RESUME": "1"})
    assert "--ratio must be in" in error_line(off.stderr)


def test_shell_completion_script() -> None:
    # --show-completion names the shell it runs under (found from the parent processes), so it runs under bash
    # here; without a shell above it (a detached job) there is nothing to detect. "; exit" keeps bash from
    # exec-ing ptp in its place.
    result = subprocess.run(["bash", "-c", '"$0" --show-completion; exit $?', PTP], capture_output=True,
                            env=_env(None, None), timeout=TIMEOUT, check=False)
    assert result.returncode == 0 and b"_PTP_COMPLETE" in result.stdout


def test_methods_lists_every_registered_method_and_preset() -> None:
    from ptp_cli.pruning import METHODS, PRESETS

    text, as_json = start("methods"), start("methods", "--json")
    code, out, _ = finish(text)
    assert code == 0
    listed = {line.split()[0] for line in out.decode().splitlines() if line.startswith("  ")}
    assert listed == set(METHODS) | set(PRESETS)
    code, out, _ = finish(as_json)
    data = json.loads(out)
    assert code == 0 and set(data["methods"]) == set(METHODS) and all(data["methods"].values())
    for name, preset in PRESETS.items():
        settings = data["presets"][name]
        for field in dataclasses.fields(preset):
            key = "token_score" if field.name == "use_token_score" else field.name
            value = getattr(preset, field.name)
            assert settings[key] == (list(value) if isinstance(value, tuple) else value), (name, key)


# ---------------------------------------------------------------------------------------------------------
# --check, --image-root


def _bad_and_good_records(folder: Path) -> tuple[Path, list[int]]:
    """An input with good records and one of each kind of bad one; returns it and the bad lines."""
    Image.new("RGB", (900, 450), (10, 120, 30)).save(folder / "wide.png")  # 2x1 grid + thumbnail = 3 tiles
    full = (folder / "wide.png").read_bytes()
    (folder / "cut.png").write_bytes(full[: len(full) // 3])
    (folder / "notes.png").write_text("not an image")
    lines: list[dict[str, Any] | str] = [
        {"id": "ok1", "image": "wide.png", "question": "what?"},
        "{not json",
        {"id": "noq", "image": "wide.png"},
        {"id": "missing", "image": "nowhere.png", "question": "q"},
        "",  # blank: no record, no error
        {"id": "cut", "image": "cut.png", "question": "q"},
        {"id": "text", "image": "notes.png", "question": "q"},
        {"id": "tiles", "image": "wide.png", "question": "q", "min_tiles": 5},  # above --max-tiles 4
        {"id": "ok2", "image": str(folder / "wide.png"), "question": "and?"},
    ]
    return write_jsonl(folder / "in.jsonl", lines), [2, 3, 4, 6, 7, 8]


def test_check_finds_every_bad_record_without_a_model(tmp_path: Path) -> None:
    path, bad = _bad_and_good_records(tmp_path)
    result = run("infer", path.name, "--check", "--max-tiles", "4", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    err = result.stderr.decode()
    assert result.returncode == 3 and result.stdout == b"", err
    named = sorted(int(line.split()[2]) for line in err.splitlines() if line.startswith("ptp: line "))
    assert named == bad
    assert "checked 8 records: 2 ok, 6 would fail; 6 tiles (1536 visual tokens" in err
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"image": "wide.png", "question": "q"}])
    ok = run("infer", clean.name, "--check", cwd=tmp_path)
    assert ok.returncode == 0 and "1 ok, 0 would fail" in ok.stderr.decode()


def test_check_reads_a_given_model_config_only(tmp_path: Path, ptp_home: Path, config_only: Path) -> None:
    Image.new("RGB", (900, 450)).save(tmp_path / "wide.png")
    write_jsonl(tmp_path / "in.jsonl", [{"image": "wide.png", "question": "q"}])
    result = run("infer", "in.jsonl", "--check", "--model", str(config_only), "--max-tiles", "1", cwd=tmp_path)
    assert result.returncode == 0 and "1 tile (" in result.stderr.decode()
    unknown = run("infer", "in.jsonl", "--check", "--model", str(tmp_path / "nothing"), cwd=tmp_path)
    assert unknown.returncode == 0 and "InternVL2's tiling" in unknown.stderr.decode()


def test_image_root_for_stdin_and_a_hint_without_it(tmp_path: Path, ptp_home: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(images / "a.png")
    stdin = b"".join(json.dumps(r).encode() + b"\n" for r in records(3, "a.png"))
    with_root = start("infer", "-", *TINY, "--image-root", "images", cwd=tmp_path, home=ptp_home)
    without = start("infer", "-", *TINY, cwd=tmp_path, home=ptp_home)
    code, out, err = finish(with_root, stdin)
    assert code == 0, err.decode()
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["r0", "r1", "r2"]
    code, out, err = finish(without, stdin)
    assert code == 3 and len(out.splitlines()) == 3
    hints = [line for line in err.decode().splitlines() if "hint:" in line]
    assert len(hints) == 1 and "--image-root" in hints[0] and "3 of 3 records" in hints[0]


# ---------------------------------------------------------------------------------------------------------
# --resume refusal


def test_resume_refusal_names_what_changed_before_any_weights_load(tmp_path: Path, ptp_home: Path) -> None:
    from ptp_cli.builders.tiny import ensure_tiny

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny(cache_dir=ptp_home / "models"), model)
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    write_jsonl(tmp_path / "in.jsonl", records(3, "img.png"))
    args = ["infer", "in.jsonl", *TINY, "--model", str(model), "-o", "out.jsonl", "--resume"]
    first = run(*args, cwd=tmp_path, home=ptp_home)
    assert first.returncode == 0, first.stderr.decode()
    for weights in model.glob("*.safetensors*"):
        weights.unlink()  # from here on, loading the weights would fail (exit 1)
    before = (tmp_path / "out.jsonl").read_bytes()
    refused = run(*args, "--ratio", "0.25", "--alpha", "0.7", cwd=tmp_path, home=ptp_home)
    line = error_line(refused.stderr)
    assert refused.returncode == 2 and "alpha 0.5 -> 0.7; ratio 0.5 -> 0.25)" in line and "--force-resume" in line
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_resume_keeps_the_exit_code_of_kept_error_rows_and_loads_nothing_when_done(
    tmp_path: Path, ptp_home: Path
) -> None:
    """A resumed output that still holds error rows exits 3 and names --retry-errors; with nothing left to do,
    one line and no model (its weights are gone: loading them would exit 1)."""
    from ptp_cli.builders.tiny import ensure_tiny

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny(cache_dir=ptp_home / "models"), model)
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    good, missing = records(2, "img.png"), {"id": "gone", "image": "missing.png", "question": "q"}
    write_jsonl(tmp_path / "in.jsonl", [good[0], missing])
    args = ["infer", "in.jsonl", *TINY, "--model", str(model), "-o", "out.jsonl", "--resume"]
    assert run(*args, cwd=tmp_path).returncode == 3
    write_jsonl(tmp_path / "in.jsonl", [good[0], missing, good[1]])
    more = run(*args, cwd=tmp_path)
    err = more.stderr.decode()
    assert more.returncode == 3, err
    assert "1 ok, 0 failed" in err and "out.jsonl holds 1 error row from an earlier run" in err
    assert "--retry-errors" in err
    for weights in model.glob("*.safetensors*"):
        weights.unlink()
    done = run(*args, cwd=tmp_path)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 3, lines
    assert any(line.startswith("ptp: nothing left to do: every record of in.jsonl already has a row") for line in lines)
    assert not any("loaded" in line for line in lines) and "--retry-errors" in lines[-1]
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == 3


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank-lines"])
def test_empty_input_says_so_and_loads_no_model(tmp_path: Path, config_only: Path, content: bytes) -> None:
    (tmp_path / "in.jsonl").write_bytes(content)
    for source, stdin in (("in.jsonl", None), ("-", content)):
        result = run("infer", source, "--model", str(config_only), cwd=tmp_path, stdin=stdin)
        what = "stdin" if source == "-" else "in.jsonl"
        assert result.returncode == 0 and result.stdout == b"", result.stderr.decode()
        assert result.stderr.decode().splitlines() == [f"ptp: no records in {what}"]


def test_scan_output_lists_the_changed_settings(tmp_path: Path) -> None:
    old = {"model": "m", "ratio": 0.5, "seed": 0, "max_tiles": 6}
    path = write_jsonl(tmp_path / "out.jsonl", [{"id": 1, "line": 1, "answer": "a", "settings": old}])
    new = {"model": "m", "ratio": 0.5, "seed": 1.0, "method": "vtw", "max_tiles": 6}
    with pytest.raises(Exception, match=r"\(method unset -> \"vtw\"; seed 0 -> 1\.0\)"):
        scan_output(path, settings=new)
    assert scan_output(path, settings=old).done == {1}


def test_checks_split_into_model_free_and_layer_checks() -> None:
    from ptp_cli.config import SHAPES
    from ptp_cli.errors import UsageError
    from ptp_cli.pruning import METHODS, PRESETS, PruneConfig
    from ptp_cli.run.devices import DTYPES
    from ptp_cli.run.pipeline import RunConfig
    from ptp_cli.settings import DTYPE_NAMES, method_names, preset_names

    # The torch-free tables name every dtype, method and preset the library takes, and nothing else.
    assert set(DTYPE_NAMES) == {"auto", *DTYPES}
    assert set(method_names()) == set(METHODS) and set(preset_names()) == set(PRESETS)
    deep = PruneConfig(vit_layer=30)  # no model needed, and nothing to object to without one
    with pytest.raises(UsageError, match=r"--vit-layer must be in \[0, 23\] for this model, got 30"):
        deep.check_layers(SHAPES["internvl2-2b"])
    with pytest.raises(UsageError, match="--pdrop-keep must be in"):
        RunConfig(prune=PruneConfig(pdrop_keep=0.0))  # building a config checks it
    with pytest.raises(UsageError, match=r"--min-tiles \(4\) is larger than --max-tiles \(2\)"):
        RunConfig(min_tiles=4, max_tiles=2)
