"""The library API: records in, rows out, in order; batching by length changes nothing but speed."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from tiny_random import image_records

from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig
from ptp_cli.run.pipeline import Pipeline, RunConfig

SIZES = [(448, 448), (1400, 460), (448, 448), (900, 900), (460, 1400), (448, 448)]


@pytest.fixture(scope="module")
def records_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_records(tmp_path_factory.mktemp("records"), SIZES, inserts={3: b"{not json"})


def run(ptp_home: Path, path: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> list[dict]:
    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    cfg = RunConfig(model="tiny", max_new_tokens=3, max_tiles=4, prune=PruneConfig(method="ptp", ratio=0.5), **kw)
    return list(Pipeline.load(cfg).infer(iter_records(path)))


def test_rows_in_order_and_batching_changes_nothing(ptp_home, records_file, monkeypatch):
    one = run(ptp_home, records_file, monkeypatch, batch_size=1)
    many = run(ptp_home, records_file, monkeypatch, batch_size=3)
    assert [r["line"] for r in one] == [r["line"] for r in many] == list(range(1, 8))
    assert one[3]["error"]["type"] == "invalid_record"
    for a, b in zip(one, many, strict=True):
        assert a.get("answer") == b.get("answer")
        assert a.get("tokens") == b.get("tokens")
    assert max(r["timing"]["batch"] for r in many if "timing" in r) == 3


def test_batches_group_similar_lengths(ptp_home, records_file, monkeypatch):
    rows = [r for r in run(ptp_home, records_file, monkeypatch, batch_size=3) if "tokens" in r]
    # Three 1-tile images and three multi-tile ones: bucketing puts the 1-tile ones together.
    single = [r for r in rows if r["tokens"]["tiles"] == 1]
    assert len(single) == 3
    assert len({r["timing"]["vit"] for r in single}) == 1, "the 1-tile requests should share one batch"


def test_max_batch_tokens_bounds_the_padded_batch(ptp_home, records_file, monkeypatch):
    rows = [r for r in run(ptp_home, records_file, monkeypatch, batch_size=6, max_batch_tokens=700) if "tokens" in r]
    by_batch: dict[float, list[dict]] = {}
    for r in rows:
        by_batch.setdefault(r["timing"]["vit"], []).append(r)
    for batch in by_batch.values():
        # Padded size: the longest unpruned prompt of the batch (visual tokens before pruning + text).
        longest = max(r["tokens"]["prompt"] + r["tokens"]["visual_before"] - r["tokens"]["visual_after"] for r in batch)
        assert len(batch) == 1 or len(batch) * longest <= 700


def test_a_question_that_breaks_the_prompt_is_an_error_row(ptp_home, records_file, monkeypatch, tmp_path):
    """Pipeline.prepare goes through the input processor: a question spelling the image token fails alone."""
    lines = [orjson.dumps({"id": "bad", "image": str(records_file.parent / "0.png"), "question": "<IMG_CONTEXT>?"}),
             orjson.dumps({"id": "ok", "image": str(records_file.parent / "0.png"), "question": "What colour?"})]
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad, ok = run(ptp_home, path, monkeypatch, batch_size=2)
    assert bad["error"]["type"] == "prompt_error" and "IMG_CONTEXT" in bad["error"]["message"]
    assert "answer" in ok
