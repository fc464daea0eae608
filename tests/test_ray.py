"""ptp on Ray Data: the same rows as one process, every record exactly once, also when an actor dies."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import orjson
import pytest

ray = pytest.importorskip("ray")

from tiny_random import image_records  # noqa: E402

from ptp_cli.io.records import default_root, iter_lines, iter_records  # noqa: E402
from ptp_cli.pruning import PruneConfig  # noqa: E402
from ptp_cli.run.pipeline import Pipeline, RunConfig  # noqa: E402
from ptp_cli.run.ray import PTPPredictor, block_size, run_ray  # noqa: E402

CONFIG = RunConfig(model="tiny", max_new_tokens=3, max_tiles=4, batch_size=2, prune=PruneConfig(ratio=0.5))
SIZES = [(448, 448), (1400, 460), (900, 900), (460, 1400), (448, 448), (700, 500), (448, 900)]


@pytest.fixture(scope="module")
def local_ray(ptp_home: Path):
    """One local Ray for the module; its workers inherit PTP_HOME (the tiny model) and talk over loopback."""
    saved = dict(os.environ)
    os.environ["PTP_HOME"] = str(ptp_home)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # a single-node Ray on 127.0.0.1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get this module's classes
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def records_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = orjson.dumps({"id": "gone", "image": "missing.png", "question": "Where?"})
    return image_records(tmp_path_factory.mktemp("ray_records"), SIZES, inserts={2: b"{not json", 5: missing})


def essentials(row: dict) -> tuple:
    return row["line"], row["id"], row.get("answer"), row.get("tokens"), row.get("error")


def single_process(path: Path) -> list[dict]:
    return list(Pipeline.load(CONFIG).infer(iter_records(path)))


def on_ray(path: Path, **kw) -> list[tuple[int, dict]]:
    return list(run_ray(iter_lines(path), CONFIG, image_root=default_root(path), actors=2, **kw))


class Signed(PTPPredictor):
    """Signs every row with the process that computed it."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["row"] = [orjson.dumps({**orjson.loads(r), "pid": os.getpid()}).decode() for r in out["row"]]
        return out


def test_ray_rows_equal_one_process_and_every_actor_gets_records(local_ray, records_file):
    expected = single_process(records_file)
    got = on_ray(records_file, predictor=Signed)  # 9 records, 2 actors, the default block size
    assert [seq for seq, _ in got] == list(range(len(expected)))
    assert [essentials(r) for _, r in got] == [essentials(r) for r in expected]
    assert len({r["pid"] for _, r in got}) == 2, "one actor did all the work"
    assert block_size(6, actors=2, batch_size=8) == 3 and block_size(1000, actors=2, batch_size=8) == 32
    kinds = {r["line"]: r["error"]["type"] for _, r in got if r.get("error")}
    assert kinds == {3: "invalid_record", 6: "image_error"}


class CrashOnce(PTPPredictor):
    """Kills its own worker process on the first batch of the run (a lost node, as Ray sees it)."""

    marker: str = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.slow  # in CI's own step (.ci/run): keeps the default run under 10 minutes on 2 cores
def test_a_killed_actor_loses_and_duplicates_nothing(local_ray, records_file, tmp_path):
    crash = type("CrashHere", (CrashOnce,), {"marker": str(tmp_path / "crashed")})
    got = on_ray(records_file, predictor=crash)
    assert (tmp_path / "crashed").exists(), "the actor never crashed: the test tested nothing"
    lines = [r["line"] for _, r in got]
    assert lines == sorted(set(lines)) and len(lines) == len(single_process(records_file))


def predict(items: list[dict]) -> list[dict]:
    ds = ray.data.from_items(items).map_batches(
        PTPPredictor, fn_constructor_kwargs={"config": CONFIG}, compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=len(items), num_cpus=1,
    )
    return sorted(ds.take_all(), key=lambda r: r["line"])


@pytest.mark.slow  # in CI's own step (.ci/run): keeps the default run under 10 minutes on 2 cores
def test_predictor_maps_plain_columns_and_image_bytes(local_ray, records_file):
    image = records_file.parent / "1.png"
    # A column holds paths or bytes, not both (Arrow gives a column one type): two datasets.
    by_path = predict([
        {"id": "path", "image": str(image), "question": "Which colour?", "line": 1},
        {"id": "no-question", "image": str(image), "line": 2},
    ])
    by_bytes = predict([{"id": "bytes", "image": image.read_bytes(), "question": "Which colour?", "line": 1}])
    assert [r["id"] for r in by_path + by_bytes] == ["path", "no-question", "bytes"]
    assert by_path[0]["error"] is None and by_bytes[0]["error"] is None
    assert by_path[0]["answer"] == by_bytes[0]["answer"], "a path and its bytes give the same answer"
    assert orjson.loads(by_path[0]["row"])["tokens"] == orjson.loads(by_bytes[0]["row"])["tokens"]
    assert by_path[1]["answer"] is None and by_path[1]["error"].startswith("invalid_record")


def test_cli_ray_resumes_a_partial_output_to_the_one_process_file(ptp_home, records_file, tmp_path):
    """`ptp infer --ray --resume` completes a file a single process started: every line once, same rows."""
    from test_cli import parse_rows, ptp

    args = ["infer", str(records_file), "--model", "tiny", "--max-new-tokens", "3", "--max-tiles", "4",
            "--batch-size", "2"]
    single = tmp_path / "single.jsonl"
    assert ptp(*args, "-o", str(single), home=ptp_home).returncode == 3  # two bad records on purpose
    partial = tmp_path / "ray.jsonl"
    head = single.read_bytes().splitlines(keepends=True)[:3]
    partial.write_bytes(b"".join(head) + b'{"id": "torn')  # a run killed mid-write
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the local Ray on 127.0.0.1 only
    result = ptp(*args, "-o", str(partial), "--resume", "--ray", "--ray-workers", "2", home=ptp_home, env=loopback)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    assert b"running on Ray (local): 2 actors" in result.stderr
    # Ray's own lines: no error lines (Python's or its C++ core's "[date time E pid tid]"), no tracebacks, no
    # notices about ptp's own settings, from the start to a clean exit.
    ray_lines = [line for line in result.stderr.decode().splitlines() if not line.startswith("ptp: ")]
    alarming = re.compile(r"ERROR|Error|Traceback|Progress bars|\[[^]]* [EF] \d+ \d+\]")
    assert not [line for line in ray_lines if alarming.search(line)], ray_lines
    got, expected = parse_rows(partial.read_bytes()), parse_rows(single.read_bytes())
    assert [r["line"] for r in got] == [r["line"] for r in expected]  # each line once, in order
    assert [essentials(r) for r in got] == [essentials(r) for r in expected]
    assert all(r["settings"] == expected[0]["settings"] for r in got)


@pytest.mark.slow  # a second model load per actor
def test_ray_with_vit_prune_equals_one_process(local_ray, records_file):
    config = dataclasses.replace(CONFIG, prune=PruneConfig(ratio=0.5, vit_prune=0.25))
    expected = list(Pipeline.load(config).infer(iter_records(records_file)))
    got = list(run_ray(iter_lines(records_file), config, image_root=default_root(records_file), actors=2))
    assert [essentials(r) for _, r in got] == [essentials(r) for r in expected]
    assert all(r["pruning"]["vit_kept_per_tile"] for _, r in got if not r.get("error"))
