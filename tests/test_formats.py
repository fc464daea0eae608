"""Inputs and outputs beyond JSONL (``ptp_cli.io.formats``): the same records from Parquet (bytes, struct and path
images), a ``datasets`` ``save_to_disk`` folder, WebDataset shards and an OpenAI batch file; the same answers
from each (one tiny model for every format); Parquet and batch outputs; positions for --shard and --resume;
bad input as error rows; mislabelled files as usage errors."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ptp_cli.errors import UsageError
from ptp_cli.io.formats import Columns, open_input, output_sink, read_rows, scan
from ptp_cli.io.formats.base import expand_braces
from ptp_cli.io.formats.openai import read_batch_row
from ptp_cli.io.output import OrderedWriter
from ptp_cli.io.records import BadRecord, Record
from samples.make_formats import write_batch, write_hf_folder, write_parquet, write_shards

pytest.importorskip("pyarrow")

FORMATS = ["jsonl", "parquet-bytes", "parquet-struct", "parquet-path", "hf", "webdataset", "openai"]
COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (230, 200, 40)]
N = len(COLOURS) + 1  # the last record's image is missing


def _records(root: Path) -> list[dict[str, Any]]:
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (300 + 40 * i, 200), c).save(root / f"img{i}.png")
    recs = [{"id": f"r{i}", "image": f"img{i}.png", "question": f"What colour is picture {i}?", "topic": f"t{i % 2}"}
            for i in range(len(COLOURS))]
    recs.append({"id": "gone", "image": "missing.png", "question": "What is here?", "topic": "t0"})
    return recs


def _write(fmt: str, recs: list[dict[str, Any]], root: Path) -> str:
    """The records in ``fmt``, in a folder of their own beside the images; the path ptp reads."""
    out = root / fmt
    out.mkdir()
    if fmt == "jsonl":
        lines = [json.dumps({**r, "image": str(root / r["image"])}) for r in recs]
        (out / "in.jsonl").write_text("\n".join(lines) + "\n")
        return str(out / "in.jsonl")
    if fmt.startswith("parquet"):
        kind = fmt.split("-")[1]
        rel = [{**r, "image": str(root / r["image"])} for r in recs] if kind == "path" else recs
        return str(write_parquet(rel, root, out / "in.parquet", image=kind, row_group_size=3))
    if fmt == "hf":
        return str(write_hf_folder(recs, root, out / "ds"))
    if fmt == "webdataset":
        write_shards(recs, root, out, shards=2)
        return str(out / "questions-{0..1}.tar")
    assert fmt == "openai"
    return str(write_batch(recs, root, out / "batch.jsonl"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    recs = _records(root)
    return {fmt: _write(fmt, recs, root) for fmt in FORMATS}


def _image_bytes(image: Path | bytes) -> bytes:
    return image if isinstance(image, bytes) else image.read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_records(fmt: str, sources: dict[str, str]) -> None:
    reader = open_input(sources[fmt])
    items = list(reader.records())
    base = list(open_input(sources["jsonl"]).records())
    assert [i.line for i in items] == list(range(1, N + 1))
    assert [str(i.id) for i in items[:-1]] == [str(b.id) for b in base[:-1]]
    for got, want in zip(items[:-1], base[:-1], strict=True):
        assert isinstance(got, Record) and isinstance(want, Record)
        assert got.question == want.question
        assert _image_bytes(got.image) == _image_bytes(want.image)
        if fmt != "openai":  # a batch request carries no other fields
            assert got.extra.get("topic") == want.extra["topic"]
    last = items[-1]  # the missing image: an error row in place, whatever the format
    assert isinstance(last, BadRecord) or (isinstance(last.image, Path) and not last.image.exists())


@pytest.mark.parametrize("fmt", ["jsonl", "parquet-struct", "hf", "webdataset", "openai"])
def test_shards_and_skips_cover_every_record_once(fmt: str, sources: dict[str, str]) -> None:
    reader = open_input(sources[fmt])
    shards = [[i.line for i in reader.records(shard=(k, 3))] for k in range(3)]
    assert sorted(p for s in shards for p in s) == list(range(1, N + 1))
    assert shards[1] == [2, 5]
    assert [i.line for i in reader.records(skip=frozenset({1, 2, 5}))] == [3, 4]
    if (n := reader.count(shard=(1, 3), skip=frozenset({5}))) is not None:
        assert n == 1


def test_brace_patterns_expand_with_padding() -> None:
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: error rows in place; a file that is not what it says: a usage error


def test_bad_cells_become_error_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = io.BytesIO()
    Image.new("RGB", (50, 50)).save(png, format="PNG")
    table = pa.table({"image": [png.getvalue(), b"not an image", None, png.getvalue()],
                      "question": ["ok?", "bytes?", "none?", None]})
    pq.write_table(table, tmp_path / "t.parquet")
    items = list(open_input(str(tmp_path / "t.parquet")).records())
    assert isinstance(items[0], Record) and isinstance(items[1], Record)  # bad bytes fail at decoding: image_error
    assert isinstance(items[2], BadRecord) and "image cell is empty" in str(items[2].error)
    assert isinstance(items[3], BadRecord) and "question column 'question' is missing" in str(items[3].error)


def test_wrong_columns_list_the_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"picture": [b"x"], "ask": ["?"]}), tmp_path / "t.parquet")
    with pytest.raises(UsageError, match=r"--image-column.*its columns: picture, ask"):
        open_input(str(tmp_path / "t.parquet"))
    with pytest.raises(UsageError, match="no column 'img'"):
        open_input(str(tmp_path / "t.parquet"), columns=Columns(image="img", question="ask"))
    items = list(open_input(str(tmp_path / "t.parquet"), columns=Columns(image="picture", question="ask")).records())
    assert items[0].id == 1


@pytest.mark.parametrize(("name", "content", "message"), [
    ("x.parquet", b'{"id": 1}\n', "not a Parquet file"),
    ("x.tar", b"hello" * 200, "not a tar file"),
    ("x.arrow", b"PAR1....PAR1", "not an Arrow IPC file"),
])
def test_a_mislabelled_file_is_a_usage_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=message):
        open_input(str(tmp_path / name))


def test_a_truncated_shard_ends_with_an_error_row_and_the_next_shard_is_read(tmp_path: Path) -> None:
    recs = _records(tmp_path)[:4]
    a, _ = write_shards(recs, tmp_path, tmp_path / "wds", shards=2)
    data = a.read_bytes()
    cut = data.index(b"000001.png") + 512 + 100  # inside the second sample's image
    a.write_bytes(data[:cut])
    items = list(open_input(str(tmp_path / "wds" / "questions-{0..1}.tar")).records())
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["Record", "BadRecord", "Record", "Record"], [getattr(i, "error", None) for i in items]
    assert "truncated" in str(items[1].error) and items[2].id == "r2"


def test_malformed_batch_lines_are_error_rows(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("RGB", (40, 40)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    img = {"type": "image_url", "image_url": {"url": url}}

    def req(cid: str, content: list[Any], **body: Any) -> str:
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "m", "messages": [{"role": "user", "content": content}], **body}})

    lines = [req("ok", [img, {"type": "text", "text": "Q?"}], max_tokens=7, temperature=0),
             "{broken", req("two", [img, img, {"type": "text", "text": "Q?"}]),
             req("none", [{"type": "text", "text": "Q?"}]),
             req("web", [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}, {"type": "text", "text": "Q"}]),
             req("file", [{"type": "image_url", "image_url": {"url": "file:///tmp/a%20b.png"}},
                          {"type": "text", "text": "Q"}])]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    items = list(open_input(str(tmp_path / "b.jsonl")).records())
    assert isinstance(items[0], Record) and items[0].overrides == {"max_new_tokens": 7, "temperature": 0.0}
    assert items[0].id == "ok" and items[0].extra == {"model": "m"}
    assert isinstance(items[1], BadRecord) and items[1].line == 2
    assert "2 images" in str(items[2].error) and "no image_url" in str(items[3].error)
    assert "not supported" in str(items[4].error)
    assert items[5].image == Path("/tmp/a b.png")


# ---------------------------------------------------------------------------------------------------------
# Outputs


def _rows(n: int, *, fp_model: str = "tiny") -> list[dict[str, Any]]:
    settings = {"model": fp_model, "ratio": 0.5}
    rows: list[dict[str, Any]] = []
    for i in range(1, n + 1):
        if i % 4 == 0:
            rows.append({"id": f"r{i}", "line": i, "error": {"type": "image_error", "message": "bad", "limit": 3},
                         "settings": settings, "topic": "a"})
        else:
            rows.append({"id": i if i % 2 else f"r{i}", "line": i, "answer": f"ans {i}", "finish_reason": "stop",
                         "tokens": {"visual_before": 512, "visual_after": 256, "visual_per_tile": [128, 128],
                                    "tiles": 2, "prompt": 300, "generated": 3},
                         "timing": {"prefill": 0.1, "batch": 2}, "method": "ptp", "settings": settings,
                         "topic": "a", "nested": {"k": [1, 2]}})
    return rows


def _write_rows(path: Path, fmt: str, rows: list[dict[str, Any]], *, resume: bool = False) -> None:
    with OrderedWriter(output_sink(str(path), format=fmt, resume=resume, stdout=None), window=8) as w:
        for seq in (1, 0, *range(2, len(rows))):  # out of order at first
            w.put(seq, rows[seq])


def test_parquet_output_round_trips_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    rows = _rows(10)
    _write_rows(out, "parquet", rows[:6])
    state = scan(str(out), format="parquet", settings=rows[0]["settings"], force=False, retry_errors=False)
    assert state.done == frozenset(range(1, 7)) and state.error_rows == 1
    _write_rows(out, "parquet", rows[6:], resume=True)  # the rest, in parts after the first run's
    back = list(read_rows(out))
    assert [r["line"] for r in back] == list(range(1, 11))
    first = back[:6]
    assert first[0]["id"] == 1 and first[1]["id"] == "r2"  # integer ids come back as integers
    assert first[0]["answer"] == "ans 1" and first[0]["tokens"]["visual_per_tile"] == [128, 128]
    assert first[3]["error"] == {"type": "image_error", "message": "bad", "limit": 3}
    assert first[0]["nested"] == '{"k":[1,2]}' and first[0]["topic"] == "a"
    with pytest.raises(UsageError, match=r"other settings \(model \"tiny\" -> \"other\"\)"):
        scan(str(out), format="parquet", settings={"model": "other", "ratio": 0.5}, force=False, retry_errors=False)
    retried = scan(str(out), format="parquet", settings=rows[0]["settings"], force=False, retry_errors=True)
    assert 4 not in retried.done and 8 not in retried.done
    assert all("error" not in r for r in read_rows(out))


def test_a_killed_parquet_write_keeps_whole_parts_only(tmp_path: Path) -> None:
    from ptp_cli.io.formats.parquet_out import ParquetSink

    out = tmp_path / "out.parquet"
    sink = ParquetSink(out, resume=False, part_rows=3)
    rows = _rows(8)
    sink.write([sink.encode(r) for r in rows[:7]])  # one part of 7 rows (written when the buffer reached 3)
    sink.write([sink.encode(rows[7])])  # buffered, not yet in a part: a kill now loses it
    (out / ".part-000009.tmp").write_bytes(b"PAR1 torn")  # a part being written when the run was killed
    state = scan(str(out), format="parquet", settings=rows[0]["settings"], force=False, retry_errors=False)
    assert state.done == frozenset(range(1, 8)) and not (out / ".part-000009.tmp").exists()
    # Killed mid-merge, after the merged part was in place: the parts it replaced are dropped, no row twice.
    sink.flush()
    parts = sorted(out.glob("part-*.parquet"))
    merged = out / "part-000005.parquet"
    merged.write_bytes(parts[0].read_bytes())
    (out / ".merge.json").write_text(json.dumps({"final": merged.name, "parts": [parts[0].name]}))
    state = scan(str(out), format="parquet", settings=rows[0]["settings"], force=False, retry_errors=False)
    assert [p.name for p in sorted(out.glob("part-*.parquet"))] == [parts[1].name, merged.name]


BATCH_OK = {"id", "custom_id", "response", "error"}


def _check_batch_line(obj: dict[str, Any]) -> None:
    """The batch output format's fields, for a success and for an error line."""
    assert set(obj) == BATCH_OK and isinstance(obj["id"], str) and isinstance(obj["custom_id"], str)
    resp = obj["response"]
    assert set(resp) == {"status_code", "request_id", "body"} and isinstance(resp["request_id"], str)
    if resp["status_code"] == 200:
        assert obj["error"] is None
        body = resp["body"]
        assert body["object"] == "chat.completion" and isinstance(body["created"], int)
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] >= 0
    else:
        assert resp["status_code"] in (400, 500)
        assert set(obj["error"]) == {"code", "message"} and obj["error"]["message"]


def test_batch_output_has_the_fields_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    rows = [{**r, "id": str(r["id"])} for r in _rows(8)]
    _write_rows(out, "openai", rows)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for obj in lines:
        _check_batch_line(obj)
    assert [o["custom_id"] for o in lines] == [r["id"] for r in rows]
    assert [read_batch_row(o)[0] for o in lines] == list(range(1, 9))
    with out.open("ab") as f:
        f.write(b'{"id": "ptp-9", "cust')  # torn by a kill
    state = scan(str(out), format="openai", settings=rows[0]["settings"], force=False, retry_errors=True)
    assert state.done == frozenset({1, 2, 3, 5, 6, 7}) and state.torn_bytes > 0
    assert len(out.read_text().splitlines()) == 6
    with pytest.raises(UsageError, match="other settings"):
        scan(str(out), format="openai", settings={"model": "x"}, force=False, retry_errors=False)
    back = list(read_rows(out))
    assert back[0] == {"id": "1", "line": 1, "answer": "ans 1", "tokens": {"prompt": 300, "generated": 3}}


def test_a_truncated_tar_member_is_not_a_record(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        info = tarfile.TarInfo("k.json")
        data = b'{"question": "q"}'
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    items = list(open_input(str(tmp_path / "a.tar")).records())
    assert isinstance(items[0], BadRecord) and "no image member" in str(items[0].error)


# ---------------------------------------------------------------------------------------------------------
# The same answers from every format (one model load per model, through the library API)


@pytest.fixture(scope="module")
def pipelines(ptp_home: Path) -> dict[str, Any]:
    return {}


def _pipeline(pipelines: dict[str, Any], model: str, ptp_home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from ptp_cli.run.pipeline import Pipeline, RunConfig

    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    if model not in pipelines:
        pipelines[model] = Pipeline.load(RunConfig(model=model, max_new_tokens=3, max_tiles=1, batch_size=4))
    return pipelines[model]


@pytest.mark.parametrize("model", ["tiny", pytest.param("mini", marks=pytest.mark.slow)])
def test_every_format_gives_the_same_answers_in_the_same_order(
    model: str, sources: dict[str, str], pipelines: dict[str, Any], ptp_home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipe = _pipeline(pipelines, model, ptp_home, monkeypatch)
    results = {fmt: list(pipe.infer(open_input(src).records())) for fmt, src in sources.items()}
    want = results["jsonl"]
    assert all(isinstance(r.get("answer"), str) for r in want[:-1]) and want[-1]["error"]["type"] == "image_error"
    for fmt, rows in results.items():
        assert [r["line"] for r in rows] == list(range(1, N + 1)), fmt
        assert [r.get("answer") for r in rows] == [r.get("answer") for r in want], fmt
        assert [r["tokens"]["prompt"] for r in rows[:-1]] == [r["tokens"]["prompt"] for r in want[:-1]], fmt
        assert [str(r["id"]) for r in rows[:-1]] == [str(r["id"]) for r in want[:-1]], fmt
        assert "error" in rows[-1], fmt


# ---------------------------------------------------------------------------------------------------------
# The command: killed with SIGKILL, then --resume, for Parquet and batch-format outputs

CLI_ARGS = ["--model", "tiny", "--max-new-tokens", "3", "--max-tiles", "1", "--batch-size", "4"]


def _essence(row: dict[str, Any]) -> tuple:
    err = row.get("error")
    return row["line"], str(row["id"]), row.get("answer"), None if err is None else err["type"]


@pytest.mark.slow  # two runs of 60 records plus the reference: about 30 s each on 2 cores
@pytest.mark.parametrize(("fmt", "out_name"), [("parquet-struct", "out.parquet"), ("openai", "out.jsonl")])
def test_resume_after_sigkill_is_exact(
    fmt: str, out_name: str, tmp_path: Path, pipelines: dict[str, Any], ptp_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import signal
    import time

    from test_cli import TIMEOUT, popen, ptp

    recs = [{**r, "id": f"{r['id']}-{k}"} for k in range(12) for r in _records(tmp_path)]  # every 5th bad
    src = _write(fmt, recs, tmp_path)
    out = tmp_path / out_name
    slow = [*CLI_ARGS[:-1], "1"]  # --batch-size 1: rows come one by one, so the kill lands mid-run
    proc = popen("infer", src, *slow, "-o", str(out), "--resume", home=ptp_home)
    deadline = time.monotonic() + TIMEOUT
    while not (list(out.glob("part-*.parquet")) if fmt.startswith("parquet") else
               out.exists() and out.read_bytes().count(b"\n") >= 6):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    resumed = ptp("infer", src, *CLI_ARGS, "-o", str(out), "--resume", home=ptp_home)
    assert resumed.returncode == 3, resumed.stderr.decode()  # the missing images: error rows
    resumed_from = re.search(r"resuming .*: (\d+) records already done", resumed.stderr.decode())
    assert resumed_from is not None and 0 < int(resumed_from[1]) < len(recs)  # killed mid-run
    rows = list(read_rows(out))
    if fmt == "openai":
        for obj in map(json.loads, out.read_text().splitlines()):
            _check_batch_line(obj)
    want = list(_pipeline(pipelines, "tiny", ptp_home, monkeypatch).infer(open_input(src).records()))
    assert [_essence(r) for r in rows] == [_essence(r) for r in want]


SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_INPUTS = ["questions.parquet", "questions.hf", "shards/questions-{0..1}.tar", "batch.jsonl"]


@pytest.mark.parametrize("name", SAMPLE_INPUTS)
def test_the_bundled_samples_check(name: str, ptp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ptp_cli.cli.main import app

    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    monkeypatch.chdir(SAMPLES)
    done = CliRunner().invoke(app, ["infer", "--check", name, "--model", "tiny"])
    assert done.exit_code == 3 and "checked 6 records: 5 ok, 1 would fail" in done.output, done.output


def test_the_command_reads_the_parquet_sample_and_writes_parquet(
    tmp_path: Path, pipelines: dict[str, Any], ptp_home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from ptp_cli.cli.main import app

    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    out = tmp_path / "out.parquet"
    done = CliRunner().invoke(app, ["infer", str(SAMPLES / "questions.parquet"), *CLI_ARGS, "-o", str(out)])
    assert done.exit_code == 3, done.output
    rows = list(read_rows(out))
    want = list(_pipeline(pipelines, "tiny", ptp_home, monkeypatch).infer(
        open_input(str(SAMPLES / "questions.jsonl")).records()))
    # The JSONL sample's document record asks for 4 tiles; the Parquet file carries that column too.
    assert [_essence(r) for r in rows] == [_essence(r) for r in want]
    assert [r["settings"]["max_tiles"] for r in rows] == [1] * 6


def test_eval_reads_gold_and_predictions_in_these_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ptp_cli.cli.main import app

    recs = [{**r, "answer": f"colour {i}"} for i, r in enumerate(_records(tmp_path)[:4])]
    gold = write_parquet(recs, tmp_path, tmp_path / "gold.parquet")
    wds = tmp_path / "wds"
    write_shards(recs, tmp_path, wds, shards=2)
    settings = {"model": "tiny"}
    rows = [{"id": r["id"], "line": i + 1, "answer": r["answer"] if i < 3 else "wrong", "finish_reason": "stop",
             "tokens": {"prompt": 10, "generated": 2}, "settings": settings} for i, r in enumerate(recs)]
    _write_rows(tmp_path / "pred.parquet", "parquet", rows)
    _write_rows(tmp_path / "pred.jsonl", "openai", rows)
    for gold_path in (gold, wds / "questions-{0..1}.tar"):
        for pred in ("pred.parquet", "pred.jsonl"):
            done = CliRunner().invoke(app, ["eval", str(gold_path), "-p", str(tmp_path / pred), "--json",
                                            str(tmp_path / "r.json")])
            assert done.exit_code == 0, done.output
            run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
            assert run["scores"] == {"exact": 0.75} and (run["n"], run["n_missing"]) == (4, 0), (gold_path, pred)


def test_without_pyarrow_a_parquet_input_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['pyarrow'] = None\nfrom ptp_cli.cli.main import main\n"
            "sys.argv = ['ptp', 'infer', '--check', sys.argv[1]]\nmain()")
    done = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "questions.parquet")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "ptp: error: Parquet and Arrow files need pyarrow: pip install 'ptp-cli[parquet]'"], done.stderr


def test_corrupt_table_data_becomes_error_rows_in_place(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    recs = _records(tmp_path)[:4] * 2  # 8 rows, row groups of 2
    path = write_parquet(recs, tmp_path, tmp_path / "t.parquet", image="bytes", row_group_size=2)
    meta = pq.ParquetFile(path).metadata
    col = next(meta.row_group(1).column(i) for i in range(meta.num_columns)
               if meta.row_group(1).column(i).path_in_schema == "image")
    data = bytearray(path.read_bytes())
    data[col.data_page_offset:col.data_page_offset + 32] = b"\xff" * 32  # the second row group's page header
    path.write_bytes(bytes(data))
    items = list(open_input(str(path)).records())
    assert [i.line for i in items] == list(range(1, 9))
    assert [type(i).__name__ for i in items] == ["Record"] * 2 + ["BadRecord"] * 2 + ["Record"] * 4
    assert "cannot read this row" in str(items[2].error)

    folder = write_hf_folder(recs, tmp_path, tmp_path / "hf")  # a stream of 2-row batches, cut short
    arrow = folder / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size * 2 // 3])
    items = list(open_input(str(folder)).records())
    assert isinstance(items[-1], BadRecord) and all(isinstance(i, Record) for i in items[:-1]) and len(items) >= 3
