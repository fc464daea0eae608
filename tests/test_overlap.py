"""``--engine vllm`` keeps vLLM fed: the pipeline queues a batch's pruned prompts and prepares the next batches
(ViT, probe) while vLLM generates, then collects rows in input order.

vLLM is replaced here by a generator that answers each prompt from its embeddings at once (tests/test_vllm.py
runs the real one): what is under test is the pipeline's scheduling, which is the same for both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_random import image_records

from ptp_cli.errors import OutOfMemoryError
from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.run.vllm_engine import VLLMEngine

# With --max-tiles 4, only the second image is read as 5 tiles (4 + thumbnail).
SIZES = [(448, 448), (1800, 448), (448, 448), (900, 448), (460, 1400), (448, 448), (700, 448), (448, 448),
         (448, 900)]


class EchoGenerator:
    """Stands in for ``VLLMGenerator``: each prompt's tokens are a function of its embeddings (so a row paired
    with another record's output is caught), and it records how many prompts were queued and not yet waited for."""

    max_model_len = 4096

    def __init__(self, refuse_longer_than: int | None = None) -> None:
        self.queued: dict[str, torch.Tensor] = {}
        self.most_queued = 0
        self.cancelled: list[str] = []
        self.refuse = refuse_longer_than
        self._n = 0

    def add(self, embeds: torch.Tensor, request) -> str:  # embeds: [S, D]
        if self.refuse is not None and embeds.shape[0] > self.refuse:
            raise ValueError(f"prompt of {embeds.shape[0]} tokens is longer than {self.refuse}")
        self._n += 1
        rid = f"r{self._n}"
        self.queued[rid] = embeds
        self.most_queued = max(self.most_queued, len(self.queued))
        return rid

    def wait(self, ids):
        out = {}
        for i in ids:
            e = self.queued.pop(i)
            tokens = [e.shape[0] % 97, int(e.double().abs().sum() * 1000) % 97, 5]
            gen = SimpleNamespace(token_ids=tokens, logprobs=None, finish_reason="length")
            out[i] = SimpleNamespace(outputs=[gen], metrics=None)
        return out

    def cancel(self, ids) -> None:
        for i in ids:
            if self.queued.pop(i, None) is not None:
                self.cancelled.append(i)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_records(tmp_path_factory.mktemp("records"), SIZES, inserts={4: b"{not json"})


def pipeline(ptp_home: Path, monkeypatch: pytest.MonkeyPatch, generator: EchoGenerator, *, in_flight: int | None,
             batch_size: int = 2) -> Pipeline:
    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    prune = PruneConfig(method="ptp", ratio=0.5, positions="contiguous")
    config = RunConfig(model="tiny", engine="vllm", max_new_tokens=3, max_tiles=4, batch_size=batch_size, prune=prune)
    base = Pipeline.load(dataclasses.replace(config, engine="ptp"))
    loaded = base.loaded
    engine = VLLMEngine(loaded.model, image_token_id=loaded.image_token_id, generator=generator,
                        method=make_method(prune, loaded.cfg))
    return Pipeline(loaded, config, engine=engine, in_flight=in_flight)


def essence(row: dict) -> tuple:
    if "error" in row:
        return row["line"], row["error"]["type"]
    return row["line"], row["answer"], row["tokens"]["prompt"], row["tokens"]["visual_after"]


def test_batches_overlap_and_rows_come_in_order(ptp_home, records, monkeypatch):
    queued, one_at_a_time = EchoGenerator(), EchoGenerator()
    rows = list(pipeline(ptp_home, monkeypatch, queued, in_flight=None).infer(iter_records(records)))
    alone = list(pipeline(ptp_home, monkeypatch, one_at_a_time, in_flight=0).infer(iter_records(records)))
    assert [r["line"] for r in rows] == list(range(1, len(SIZES) + 2))
    assert [essence(r) for r in rows] == [essence(r) for r in alone]
    assert rows[4]["error"]["type"] == "invalid_record"
    # Two batches left generating while a third was pruned and queued: 3 batches of 2 in the generator at once.
    assert queued.most_queued == 6
    assert one_at_a_time.most_queued == 2
    assert not queued.queued and not queued.cancelled


def test_a_prompt_vllm_refuses_is_that_records_error_row(ptp_home, records, monkeypatch):
    ok = list(pipeline(ptp_home, monkeypatch, EchoGenerator(), in_flight=None).infer(iter_records(records)))
    longest = max(r["tokens"]["prompt"] for r in ok if "tokens" in r)
    rows = list(pipeline(ptp_home, monkeypatch, EchoGenerator(refuse_longer_than=longest - 1),
                         in_flight=None).infer(iter_records(records)))
    refused = [r for r in rows if r.get("error", {}).get("type") == "vllm_rejected"]
    assert refused and all("longer than" in r["error"]["message"] for r in refused)
    assert len(rows) == len(ok)
    for a, b in zip(ok, rows, strict=True):
        if b not in refused:
            assert essence(a) == essence(b)
        else:
            assert a["tokens"]["prompt"] == longest


def test_a_closed_run_cancels_what_it_queued(ptp_home, records, monkeypatch):
    gen = EchoGenerator()
    rows = pipeline(ptp_home, monkeypatch, gen, in_flight=None).infer(iter_records(records))
    first = next(rows)
    assert first["line"] == 1 and gen.queued  # later batches were queued before the first row came out
    waiting = set(gen.queued)
    rows.close()
    assert set(gen.cancelled) == waiting and not gen.queued


def test_out_of_memory_while_pruning_splits_the_batch(ptp_home, records, monkeypatch):
    """A batch whose ViT runs out of memory is halved and run at once; the record that fails alone gets the error
    row, the others their answers, and the batches still queued are unaffected."""
    gen = EchoGenerator()
    p = pipeline(ptp_home, monkeypatch, gen, in_flight=None, batch_size=3)
    submit = p.engine.submit

    def fragile(requests):
        if any(r.num_tiles == 5 for r in requests):  # the second image
            raise OutOfMemoryError("out of memory in vit", stage="vit")
        return submit(requests)

    monkeypatch.setattr(p.engine, "submit", fragile)
    monkeypatch.setattr(p.engine, "generate", lambda requests: p.engine.collect(fragile(requests)))
    rows = list(p.infer(iter_records(records)))
    assert [r["line"] for r in rows] == list(range(1, len(SIZES) + 2))
    failed = [r for r in rows if r.get("error", {}).get("type") == "out_of_memory"]
    assert [r["line"] for r in failed] == [2]
    assert sum("answer" in r for r in rows) == len(SIZES) - 1


def test_bad_records_run_no_further_ahead_than_the_window(ptp_home, tmp_path, monkeypatch):
    """Error rows yield at once, rows of batches in flight later: no row may come ``reorder_window`` or more ahead
    of the oldest row not yet yielded (what ``OrderedWriter`` buffers)."""
    sizes = [(448, 448)] * 8 + [(900, 448)] * 4
    path = image_records(tmp_path, sizes, inserts={i: b"{bad" for i in range(2, 60)})
    p = pipeline(ptp_home, monkeypatch, EchoGenerator(), in_flight=None)
    pending = set(range(len(sizes) + 58))
    seen = []
    for seq, _row in p.run(iter_records(path)):
        assert seq < min(pending) + p.reorder_window
        pending.remove(seq)
        seen.append(seq)
    assert not pending and len(seen) == len(set(seen))
    assert seen != sorted(seen)  # bad records did overtake the batches in flight
