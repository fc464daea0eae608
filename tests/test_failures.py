"""Failures that cannot hide: a record's failure is one error row; a broken engine or a bug ends the run.

The failing engines are injected through the library API (``Pipeline(..., engine=...)``); the CLI's exit
codes are checked on real failures (unreadable images) in a subprocess.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import torch
from PIL import Image
from test_cli import FAST, error_line, parse_rows, ptp, write_jsonl

from ptp_cli.builders.tiny import TINY_VERSION
from ptp_cli.errors import RunAborted
from ptp_cli.io.output import OrderedWriter
from ptp_cli.io.records import iter_records
from ptp_cli.io.resume import scan_output
from ptp_cli.loading import load_model
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.engine import Engine, Request
from ptp_cli.run.failures import ALL_FAILED_MINIMUM, MAX_CONSECUTIVE_INFERENCE_ERRORS
from ptp_cli.run.pipeline import Pipeline, RunConfig

OOM = torch.cuda.OutOfMemoryError


class FlakyEngine(Engine):
    """The real engine, except that a batch holding a request ``fails`` picks raises ``error()``."""

    def __init__(self, loaded, *, fails: Callable[[Request], bool], error: Callable[[], BaseException]) -> None:
        # The pruning of the runs it is compared with (RunConfig's default method), so only the failures differ.
        method = make_method(PruneConfig(), loaded.cfg)
        super().__init__(loaded.model, image_token_id=loaded.image_token_id, method=method)
        self.fails, self.error = fails, error
        self.batches: list[int] = []  # sizes of the batches asked for

    def generate(self, requests):
        self.batches.append(len(requests))
        if any(self.fails(r) for r in requests):
            raise self.error()
        return super().generate(requests)


@pytest.fixture(scope="module")
def loaded(ptp_home):
    return load_model(str(ptp_home / "models" / TINY_VERSION))


def records(tmp_path: Path, n: int, *, big: set[int] = frozenset()) -> Path:
    """n records with 1-tile images, except those in ``big`` (4 tiles + thumbnail at max_tiles 4)."""
    Image.new("RGB", (448, 448), (10, 120, 200)).save(tmp_path / "small.png")
    Image.new("RGB", (900, 900), (200, 120, 10)).save(tmp_path / "big.png")
    lines = [orjson.dumps({"id": i, "image": "big.png" if i in big else "small.png", "question": "What?" * (1 + i % 3)})
             for i in range(n)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def pipeline(loaded, engine: Engine | None = None, **kw) -> Pipeline:
    return Pipeline(loaded, RunConfig(model="tiny", max_new_tokens=2, max_tiles=4, **kw), engine=engine)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_one_bad_record_gets_one_error_row_and_spares_its_batch(loaded, tmp_path, batch_size):
    path = records(tmp_path, 7, big={3})
    engine = FlakyEngine(loaded, fails=lambda r: r.num_tiles == 5, error=lambda: OOM("out of memory (simulated)"))
    rows = list(pipeline(loaded, engine, batch_size=batch_size).infer(iter_records(path)))
    assert [r["line"] for r in rows] == list(range(1, 8))
    (failed,) = [r for r in rows if "error" in r]
    assert failed["id"] == 3 and failed["error"]["type"] == "out_of_memory"
    assert "OutOfMemoryError: out of memory (simulated)" in failed["error"]["message"]
    # The neighbours' answers are those of a healthy engine.
    healthy = list(pipeline(loaded, batch_size=batch_size).infer(iter_records(path)))
    assert [r.get("answer") for r in rows if r["id"] != 3] == [r["answer"] for r in healthy if r["id"] != 3]
    assert 1 in engine.batches  # split down to the record alone


def test_a_failing_batch_is_split_in_halves(loaded, tmp_path):
    path = records(tmp_path, 8, big={5})
    engine = FlakyEngine(loaded, fails=lambda r: r.num_tiles == 5, error=lambda: OOM("simulated"))
    rows = list(pipeline(loaded, engine, batch_size=8).infer(iter_records(path)))
    assert sum("error" in r for r in rows) == 1
    # 8 fails -> 4 (ok) + 4 (fails) -> 2 (fails: records 4, 5) + 2 (ok) -> 1 (ok) + 1 (fails: an error row)
    assert engine.batches == [8, 4, 4, 2, 1, 1, 2]


def test_a_broken_engine_stops_the_run(loaded, tmp_path):
    path = records(tmp_path, 40)
    engine = FlakyEngine(loaded, fails=lambda r: True, error=lambda: OOM("device lost (simulated)"))
    got = []
    with pytest.raises(RunAborted, match=r"every record so far \(5\).*out_of_memory: .*OutOfMemoryError"):
        for row in pipeline(loaded, engine, batch_size=2).infer(iter_records(path)):
            got.append(row)
    assert len(got) <= ALL_FAILED_MINIMUM and all(r["error"]["type"] == "out_of_memory" for r in got)


def test_consecutive_engine_failures_stop_the_run_after_a_good_start(loaded, tmp_path):
    path = records(tmp_path, 40)
    engine = FlakyEngine(loaded, fails=lambda r: len(engine.batches) > 3, error=lambda: OOM("simulated"))
    seen = []
    with pytest.raises(RunAborted, match=f"{MAX_CONSECUTIVE_INFERENCE_ERRORS} records in a row"):
        for _, row in pipeline(loaded, engine, batch_size=1).run(iter_records(path)):
            seen.append(row)
    assert [("error" in r) for r in seen] == [False] * 3 + [True] * MAX_CONSECUTIVE_INFERENCE_ERRORS


class StageEngine(Engine):
    """The real engine, except that one stage (a public method the engine calls) raises ``error()`` for a batch
    holding a request that ``fails`` picks: the failure comes from inside the engine, as a real one would."""

    def __init__(self, loaded, *, stage: str, fails: Callable[[Request], bool], error: Callable[[], BaseException]):
        super().__init__(loaded.model, image_token_id=loaded.image_token_id, method=make_method(PruneConfig(), loaded.cfg))
        self.stage, self.fails, self.error = stage, fails, error
        self.batches: list[int] = []
        self._requests: list[Request] = []

    def generate(self, requests):
        self.batches.append(len(requests))
        self._requests = list(requests)
        return super().generate(requests)

    def _maybe_fail(self, stage: str) -> None:
        if stage == self.stage and any(self.fails(r) for r in self._requests):
            raise self.error()

    def select(self, requests, visual):
        self._maybe_fail("probe")
        return super().select(requests, visual)

    def prefill(self, prompts, *, room):
        self._maybe_fail("prefill")
        return super().prefill(prompts, room=room)


CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to " \
          "allocate 26650080000 bytes. Error code 12 (Cannot allocate memory)"


@pytest.mark.parametrize(("stage", "error"), [
    ("prefill", lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB (simulated)")),
    ("probe", lambda: RuntimeError(CPU_OOM)),
    ("prefill", lambda: RuntimeError("MPS backend out of memory (MPS allocated: 9.0 GB) (simulated)")),
])
def test_out_of_memory_on_any_device_splits_the_batch_and_names_the_stage(loaded, tmp_path, stage, error):
    path = records(tmp_path, 6, big={4})
    engine = StageEngine(loaded, stage=stage, fails=lambda r: r.num_tiles == 5, error=error)
    rows = list(pipeline(loaded, engine, batch_size=4).infer(iter_records(path)))
    assert [r["line"] for r in rows] == list(range(1, 7))
    (failed,) = [r for r in rows if "error" in r]
    assert failed["id"] == 4 and failed["error"]["type"] == "out_of_memory"
    assert failed["error"]["stage"] == stage and f"out of memory in {stage}" in failed["error"]["message"]
    assert error().args[0].split(".")[0] in failed["error"]["message"]  # the device's own words, first line
    healthy = list(pipeline(loaded, batch_size=4).infer(iter_records(path)))
    assert [r.get("answer") for r in rows if r["id"] != 4] == [r["answer"] for r in healthy if r["id"] != 4]
    assert 1 in engine.batches  # split down to the record alone


def test_an_error_that_is_not_out_of_memory_is_not_mistaken_for_it(loaded, tmp_path):
    path = records(tmp_path, 4)
    engine = StageEngine(loaded, stage="prefill", fails=lambda r: True, error=lambda: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(pipeline(loaded, engine, batch_size=2).infer(iter_records(path)))
    assert engine.batches == [2]  # a bug: neither split nor turned into rows


def test_a_bug_is_not_an_error_row(loaded, tmp_path):
    path = records(tmp_path, 6)
    engine = FlakyEngine(loaded, fails=lambda r: True, error=lambda: TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        list(pipeline(loaded, engine, batch_size=2).infer(iter_records(path)))
    assert engine.batches == [2]  # not retried record by record: a bug is not a record's failure


def test_resume_after_an_abort_writes_every_record_once(loaded, tmp_path):
    path = records(tmp_path, 30)
    out = tmp_path / "out.jsonl"
    calls = collections.Counter()

    def broken_after_two(_request: Request) -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    engine = FlakyEngine(loaded, fails=broken_after_two, error=lambda: OOM("simulated"))
    pipe = pipeline(loaded, engine, batch_size=1)
    with out.open("wb") as f, pytest.raises(RunAborted):
        writer = OrderedWriter(f, window=pipe.reorder_window)
        for seq, row in pipe.run(iter_records(path)):
            writer.put(seq, row)
    first = parse_rows(out.read_bytes())
    assert 2 < len(first) <= 2 + MAX_CONSECUTIVE_INFERENCE_ERRORS

    healthy = pipeline(loaded, batch_size=4)
    state = scan_output(out, settings_fingerprint=None, retry_errors=True)
    with out.open("ab") as f, OrderedWriter(f, window=healthy.reorder_window) as writer:
        for seq, row in healthy.run(iter_records(path, skip_lines=state.done)):
            writer.put(seq, row)
    lines = [r["line"] for r in parse_rows(out.read_bytes())]
    assert sorted(lines) == list(range(1, 31))  # every record once, none twice
    assert not any("error" in r for r in parse_rows(out.read_bytes()))


def test_cli_max_errors_exits_1_and_resume_continues(ptp_home, tmp_path):
    Image.new("RGB", (448, 448), (10, 120, 200)).save(tmp_path / "ok.png")
    recs = [{"id": i, "image": "missing.png" if i < 3 else "ok.png", "question": "What?", "answer": f"gold{i}"}
            for i in range(5)]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = tmp_path / "out.jsonl"
    first = ptp("infer", str(src), "-o", str(out), "--max-errors", "2", *FAST, home=ptp_home)
    assert first.returncode == 1, first.stderr.decode()
    line = error_line(first.stderr, alone=False)
    assert "2 records failed (--max-errors 2)" in line and "image_error" in line and "--resume" in line
    assert [r["line"] for r in parse_rows(out.read_bytes())] == [1, 2]

    again = ptp("infer", str(src), "-o", str(out), "--resume", *FAST, home=ptp_home)
    assert again.returncode == 3, again.stderr.decode()  # one more bad record, each with its row
    rows = parse_rows(out.read_bytes())
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["input"]["answer"] for r in rows] == [f"gold{i}" for i in range(5)]  # the gold answers survive
    assert again.stderr.decode().count('kept under "input"') == 1  # one warning per run, naming the field
    assert "answer" in again.stderr.decode()
