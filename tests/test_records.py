"""Reading, sharding, ordered writing and resuming of ``ptp infer`` JSONL, on real files."""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_cli.errors import ImageError, InvalidRecordError, UsageError
from ptp_cli.io.output import OrderedWriter
from ptp_cli.io.records import (
    OUTPUT_FIELDS,
    BadRecord,
    Record,
    error_row,
    fingerprint,
    iter_records,
    parse_shard,
    result_row,
)
from ptp_cli.io.resume import scan_output

SETTINGS = {"method": "ptp", "max_tiles": 6, "keep": 0.5}


def write_lines(path: Path, lines: list[bytes | str], *, eol: bytes = b"\n") -> Path:
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + eol for x in lines))
    return path


def rec(i: int, **fields: object) -> str:
    return orjson.dumps({"id": f"r{i}", "image": f"img{i}.jpg", "question": f"q{i}?", **fields}).decode()


# ---------------------------------------------------------------------------------------------------------
# Reading


def test_good_record_fields_and_relative_path(tmp_path: Path) -> None:
    sub = tmp_path / "data"
    sub.mkdir()
    src = write_lines(
        sub / "in.jsonl",
        [
            rec(1, max_tiles=12, min_tiles=2, max_new_tokens=64, temperature=0, seed=7, source="coco", answer="x"),
            '{"image": "/abs/a.png", "prompt": "  describe  "}',
            '{"id": null, "image": "~/b.png", "question": "q"}',
        ],
    )
    a, b, c = iter_records(src)
    assert a == Record(
        line=1,
        id="r1",
        image=sub / "img1.jpg",
        question="q1?",
        overrides={"max_tiles": 12, "min_tiles": 2, "max_new_tokens": 64, "temperature": 0.0, "seed": 7},
        extra={"source": "coco", "answer": "x"},  # every field ptp does not read is kept
        image_relative=True,
    )
    assert isinstance(a.overrides["temperature"], float)
    assert b.id == 2 and b.image == Path("/abs/a.png") and b.question == "describe"
    assert c.id == 3 and c.image == Path("~/b.png").expanduser()
    assert not b.image_relative and not c.image_relative  # absolute, and ~ is the home folder


def test_relative_path_with_cwd_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_lines(tmp_path / "in.jsonl", [rec(1)])
    monkeypatch.chdir("/")
    (r,) = iter_records(os.path.relpath(src, "/"))
    assert r.image == tmp_path / "img1.jpg"
    (r,) = iter_records(src, base_dir=tmp_path / "imgs")
    assert r.image == tmp_path / "imgs" / "img1.jpg"


def test_stdin_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (rec(1) + "\n\n" + rec(2) + "\n").encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    monkeypatch.chdir(tmp_path)
    out = list(iter_records("-"))
    assert [(r.line, r.id, r.image) for r in out] == [(1, "r1", tmp_path / "img1.jpg"), (3, "r2", tmp_path / "img2.jpg")]


def test_scalar_ids_kept(tmp_path: Path) -> None:
    lines = [
        '{"id": 5, "image": "a", "question": "q"}',
        '{"id": 2.5, "image": "a", "question": "q"}',
        '{"id": true, "image": "a", "question": "q"}',
        '{"id": "", "image": "a", "question": "q"}',
    ]
    ids = [r.id for r in iter_records(write_lines(tmp_path / "in.jsonl", lines))]
    assert ids == [5, 2.5, True, ""]


BAD_LINES: list[tuple[bytes, object, str]] = [
    # (line, expected BadRecord id, fragment of the message); the id is given as "LINE" when it is the line number
    (b'{"id": "a", "image": "x.jpg", "question": ', "LINE", "not valid JSON"),
    (b'{"id": "a", "image": "\xff.jpg", "question": "q"}', "LINE", "not valid UTF-8"),
    (b'[{"id": "a"}]', "LINE", "JSON array, not an object"),
    (b'"just a string"', "LINE", "JSON string, not an object"),
    (b'{"id": "a", "image": "x.jpg"}', "a", "question is missing"),
    (b'{"id": "a", "image": "x.jpg", "question": "   "}', "a", "question is empty"),
    (b'{"id": "a", "image": "x.jpg", "prompt": ""}', "a", "prompt is empty"),
    (b'{"id": "a", "image": "x.jpg", "question": 3}', "a", "question must be a string"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "prompt": "p"}', "a", "not both"),
    (b'{"id": "a", "question": "q"}', "a", "image is missing"),
    (b'{"id": "a", "image": "", "question": "q"}', "a", "image is empty"),
    (b'{"id": "a", "image": ["x"], "question": "q"}', "a", "image must be a path string"),
    (b'{"id": "a", "image": "https://x/y.jpg", "question": "q"}', "a", "URLs are not supported"),
    (b'{"id": {"k": 1}, "image": "x.jpg", "question": "q"}', "LINE", "id must be a string or a number"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "max_tiles": 0}', "a", "max_tiles must be an integer in 1..40"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "max_tiles": 41}', "a", "max_tiles"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "max_tiles": 6.0}', "a", "max_tiles"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "min_tiles": true}', "a", "min_tiles"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "min_tiles": 8, "max_tiles": 4}', "a", "larger than max_tiles"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "max_new_tokens": 0}', "a", "max_new_tokens"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "temperature": -0.1}', "a", "temperature"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "temperature": "hot"}', "a", "temperature"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "seed": -1}', "a", "seed"),
    (b'{"id": "a", "image": "x.jpg", "question": "q", "seed": "7"}', "a", "seed"),
]


@pytest.mark.parametrize(("raw", "want_id", "fragment"), BAD_LINES)
def test_bad_line_becomes_bad_record(tmp_path: Path, raw: bytes, want_id: object, fragment: str) -> None:
    # The bad line sits at physical line 3, between good lines and after a blank line.
    src = write_lines(tmp_path / "in.jsonl", [rec(1), b"", raw, rec(4)])
    out = list(iter_records(src))
    assert [type(r) for r in out] == [Record, BadRecord, Record]
    bad = out[1]
    assert isinstance(bad, BadRecord) and isinstance(bad.error, InvalidRecordError)
    assert bad.line == 3
    assert bad.id == (3 if want_id == "LINE" else want_id)
    assert fragment in str(bad.error)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    (bad,) = iter_records(write_lines(tmp_path / "in.jsonl", ['{"id": 9, "max_tiles": 99}']))
    assert isinstance(bad, BadRecord) and bad.id == 9
    msg = str(bad.error)
    assert "question is missing" in msg and "image is missing" in msg and "max_tiles" in msg


def test_crlf_bom_and_blank_lines(tmp_path: Path) -> None:
    body = b"\xef\xbb\xbf" + rec(1).encode() + b"\r\n\r\n   \t\r\n" + rec(4).encode() + b"\r\n" + rec(5).encode()
    src = tmp_path / "in.jsonl"
    src.write_bytes(body)  # the last line has no newline
    out = list(iter_records(src))
    assert all(isinstance(r, Record) for r in out)
    assert [(r.line, r.id) for r in out] == [(1, "r1"), (4, "r4"), (5, "r5")]
    assert out[0].image.name == "img1.jpg"  # no stray \r anywhere


def test_missing_input_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read input"):
        iter_records(tmp_path / "nope.jsonl")  # eager: raised before any next()


def test_skip_lines(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [rec(i) for i in range(1, 7)])
    assert [r.line for r in iter_records(src, skip_lines={2, 5})] == [1, 3, 4, 6]


# ---------------------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize(("text", "want"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2 / 10 ", (2, 10))])
def test_parse_shard_ok(text: str, want: tuple[int, int]) -> None:
    assert parse_shard(text) == want


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("4/4", "0-based"), ("1/0", "at least 1"), ("-1/4", "I/N"), ("1", "I/N"), ("a/b", "I/N"), ("1/2/3", "I/N")],
)
def test_parse_shard_bad(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_shard(text)


LINE_KINDS = st.sampled_from(["good", "bad", "blank"])


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(LINE_KINDS, max_size=40), n=st.integers(1, 7), skip_seed=st.integers(0, 2**16))
def test_shards_partition_records(kinds: list[str], n: int, skip_seed: int) -> None:
    lines = [rec(i) if k == "good" else "{oops" if k == "bad" else "" for i, k in enumerate(kinds, start=1)]
    nonblank = [i for i, k in enumerate(kinds, start=1) if k != "blank"]
    skip = set(random.Random(skip_seed).sample(nonblank, len(nonblank) // 3))
    with tempfile.TemporaryDirectory() as d:
        src = write_lines(Path(d) / "in.jsonl", lines)
        shards = [[r.line for r in iter_records(src, shard=(i, n))] for i in range(n)]
        resumed = [[r.line for r in iter_records(src, shard=(i, n), skip_lines=skip)] for i in range(n)]
    assert sorted(x for s in shards for x in s) == nonblank  # every record exactly once
    for i, s in enumerate(shards):
        assert s == [x for j, x in enumerate(nonblank) if j % n == i]  # deterministic round robin
        assert resumed[i] == [x for x in s if x not in skip]  # skipping does not move records between shards


# ---------------------------------------------------------------------------------------------------------
# Rows


def test_error_row_and_result_row(tmp_path: Path) -> None:
    assert error_row(3, "a", InvalidRecordError("no question")) == {
        "id": "a",
        "line": 3,
        "error": {"type": "invalid_record", "message": "no question"},
    }
    assert error_row(4, 4, ImageError("gone"), settings=SETTINGS)["error"]["type"] == "image_error"
    row = error_row(5, "b", ZeroDivisionError("division by zero"), settings=SETTINGS)
    assert row["error"] == {"type": "ZeroDivisionError", "message": "division by zero"}
    assert row["settings"] == SETTINGS

    (r,) = iter_records(write_lines(tmp_path / "in.jsonl", [rec(1, source="coco", tokens=3)]))
    row = result_row(r, {"answer": "cat", "id": "wrong", "tokens": {"in": 10}}, settings=SETTINGS)
    assert row == {"id": "r1", "line": 1, "answer": "cat", "tokens": {"in": 10}, "settings": SETTINGS,
                   "source": "coco", "input": {"tokens": 3}}
    assert {"answer", "error", "settings", "line", "input"} <= OUTPUT_FIELDS


def test_colliding_input_fields_are_kept_under_input(tmp_path: Path) -> None:
    fields = {"answer": "a cat", "error": None, "timing": [1], "input": {"x": 1}, "line": "L", "gold": 2}
    (r,) = iter_records(write_lines(tmp_path / "in.jsonl", [rec(1, **fields)]))
    result = {"answer": "dog", "tokens": {"in": 10}, "timing": {"vit": 0.1}}
    for row in (result_row(r, result, settings=SETTINGS),
                error_row(r.line, r.id, ImageError("gone"), settings=SETTINGS, extra=r.extra)):
        # Nothing the input held is lost, and nothing the output says is overwritten.
        assert row["input"] == {k: v for k, v in fields.items() if k != "gold"}
        assert row["gold"] == 2 and row["line"] == 1
    assert result_row(r, result)["answer"] == "dog"
    assert error_row(r.line, r.id, ImageError("gone"))["error"]["type"] == "image_error"
    (plain,) = iter_records(write_lines(tmp_path / "plain.jsonl", [rec(1, gold=2)]))
    assert "input" not in result_row(plain, result)


def test_fingerprint_stable() -> None:
    a = fingerprint({"b": 1, "a": {"y": 2, "x": [1, 2]}})
    assert a == fingerprint({"a": {"x": [1, 2], "y": 2}, "b": 1})  # key order does not matter
    assert len(a) == 12 and int(a, 16) >= 0
    assert a != fingerprint({"b": 2, "a": {"y": 2, "x": [1, 2]}})


# ---------------------------------------------------------------------------------------------------------
# Ordered writer


def read_rows(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@settings(max_examples=50, deadline=None)
@given(order=st.permutations(range(30)))
def test_writer_sorts_any_permutation(order: list[int]) -> None:
    buf = io.BytesIO()
    w = OrderedWriter(buf, window=64)
    for seq in order:
        w.put(seq, {"seq": seq})
        # everything below next_seq is written, nothing above it
        assert len(buf.getvalue().splitlines()) == w.next_seq == w.written
    w.close()
    assert [orjson.loads(x)["seq"] for x in buf.getvalue().splitlines()] == list(range(30))
    assert w.pending == 0


@settings(max_examples=40, deadline=None)
@given(window=st.integers(1, 8), total=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_writer_window_bounds_buffer(window: int, total: int, seed: int) -> None:
    # A producer reading records while it may, finishing in-flight ones in random order when it may not.
    rng = random.Random(seed)
    buf = io.BytesIO()
    w = OrderedWriter(buf, window=window)
    in_flight: list[int] = []
    next_read = 0
    while next_read < total or in_flight:
        can_read = next_read < total and w.can_accept(next_read)
        if can_read and (not in_flight or rng.random() < 0.6):
            in_flight.append(next_read)
            next_read += 1
        elif in_flight:
            w.put(in_flight.pop(rng.randrange(len(in_flight))), {"seq": 0})
            assert w.pending < window
        else:
            pytest.fail("producer stuck: cannot read and nothing in flight")
    w.close()
    assert w.written == total == len(buf.getvalue().splitlines())


def test_writer_rejects_misuse() -> None:
    w = OrderedWriter(io.BytesIO(), window=4)
    assert w.can_accept(3) and not w.can_accept(4)
    with pytest.raises(ValueError, match="beyond the window"):
        w.put(4, {})
    w.put(1, {})
    with pytest.raises(ValueError, match="already put"):
        w.put(1, {})
    w.put(0, {})
    with pytest.raises(ValueError, match="already put"):
        w.put(0, {})
    assert w.can_accept(5)


def test_writer_flushes_each_burst(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with path.open("ab") as f:
        w = OrderedWriter(f)
        w.put(1, {"n": 1})
        assert path.read_bytes() == b""  # waiting for seq 0
        w.put(0, {"n": 0})
        assert read_rows(path) == [{"n": 0}, {"n": 1}]  # on disk before close
        w.close()


def test_writer_close_with_gap_writes_rest_then_raises() -> None:
    buf = io.BytesIO()
    w = OrderedWriter(buf)
    w.put(0, {"n": 0})
    w.put(2, {"n": 2})
    with pytest.raises(RuntimeError, match=r"seq 1\b"):
        w.close()
    assert [orjson.loads(x)["n"] for x in buf.getvalue().splitlines()] == [0, 2]


def test_writer_unserialisable_row_becomes_error_row() -> None:
    buf = io.BytesIO()
    with OrderedWriter(buf) as w:
        w.put(0, {"id": "a", "line": 7, "answer": object()})
    (row,) = (orjson.loads(x) for x in buf.getvalue().splitlines())
    assert row["id"] == "a" and row["line"] == 7 and row["error"]["type"] == "serialization_error"


def test_writer_text_stream() -> None:
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, encoding="utf-8")
    text.write("header\n")
    with OrderedWriter(text) as w:
        w.put(0, {"a": "é"})
    assert raw.getvalue() == b'header\n{"a":"\xc3\xa9"}\n'


def test_writer_broken_pipe() -> None:
    r, wfd = os.pipe()
    os.close(r)  # the reader went away, like `| head -1`
    with open(wfd, "wb") as f:
        w = OrderedWriter(f)
        with pytest.raises(BrokenPipeError):
            w.put(0, {"n": 0})
        w.close()  # quiet after the pipe broke
        with pytest.raises(ValueError, match="closed"):
            w.put(1, {"n": 1})
        with pytest.raises(BrokenPipeError):
            f.close()  # (buffered bytes still cannot go anywhere)


# ---------------------------------------------------------------------------------------------------------
# Resume


def result(line: int, *, error: bool = False, s: dict = SETTINGS) -> bytes:
    row = {"id": f"r{line}", "line": line, "settings": s}
    row.update({"error": {"type": "image_error", "message": "gone"}} if error else {"answer": f"a{line}"})
    return orjson.dumps(row) + b"\n"


def test_scan_missing_and_empty(tmp_path: Path) -> None:
    state = scan_output(tmp_path / "nope.jsonl", settings_fingerprint="x")
    assert state.done == frozenset() and state.rows == 0
    (tmp_path / "empty.jsonl").touch()
    assert scan_output(tmp_path / "empty.jsonl", settings_fingerprint="x").done == frozenset()


@pytest.mark.parametrize("torn", [b'{"id": "r9", "line": 9, "ans', b'{"id": "r9", "line": 9}', b'{"id": "r9", "li\n'])
def test_scan_repairs_torn_last_line(tmp_path: Path, torn: bytes) -> None:
    path = tmp_path / "out.jsonl"
    good = result(1) + result(3) + result(2, error=True)
    path.write_bytes(good + torn)
    state = scan_output(path, settings_fingerprint=fingerprint(SETTINGS))
    assert state.done == {1, 2, 3}  # error rows count as done by default
    assert state.rows == 3 and state.error_rows == 1 and state.torn_bytes == len(torn)
    assert path.read_bytes() == good


def test_scan_retry_errors_rewrites_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(result(1) + result(2, error=True) + result(3) + result(4, error=True) + b'{"line": 5')
    path.chmod(0o640)
    state = scan_output(path, settings_fingerprint=None, retry_errors=True)
    assert state.done == {1, 3} and state.error_rows == 2 and state.rows == 2
    assert path.read_bytes() == result(1) + result(3)
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


def test_scan_fingerprint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    original = result(1) + result(2) + b'{"torn'
    path.write_bytes(original)
    other = {**SETTINGS, "keep": 0.25}
    with pytest.raises(UsageError, match=r"other settings \(fingerprints \w{12} -> \w{12}\).*--force-resume"):
        scan_output(path, settings_fingerprint=fingerprint(other))
    with pytest.raises(UsageError, match=r"other settings \(keep \S+ -> 0\.25\)"):
        scan_output(path, settings=other)  # the settings themselves: the message says what changed
    assert path.read_bytes() == original  # refused before touching the file
    state = scan_output(path, settings_fingerprint=fingerprint(other), force=True)
    assert state.done == {1, 2} and state.fingerprints == {fingerprint(SETTINGS)}
    assert path.read_bytes() == result(1) + result(2)


def test_scan_mixed_fingerprints_in_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(result(1) + result(2, s={"method": "none"}))
    with pytest.raises(UsageError, match="other settings"):
        scan_output(path, settings_fingerprint=fingerprint(SETTINGS))


@pytest.mark.parametrize(
    ("middle", "fragment"),
    [(b"{not json\n", "line 2: invalid JSON"), (b'{"answer": "x"}\n', "line 2: not a ptp result row"), (b"[1]\n", "line 2")],
)
def test_scan_refuses_foreign_file(tmp_path: Path, middle: bytes, fragment: str) -> None:
    path = tmp_path / "out.jsonl"
    original = result(1) + middle + result(3)
    path.write_bytes(original)
    with pytest.raises(UsageError, match=fragment):
        scan_output(path, settings_fingerprint=None, force=True)
    assert path.read_bytes() == original


def test_killed_run_then_resume_covers_every_record_once(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    lines = [rec(i) if i % 7 else ("{broken" if i % 2 else "") for i in range(1, 51)]
    write_lines(inp, lines)
    expected = [i for i, x in enumerate(lines, start=1) if x]
    out = tmp_path / "out.jsonl"
    fp = fingerprint(SETTINGS)

    def run(*, stop_after: int | None) -> None:
        done = scan_output(out, settings_fingerprint=fp).done
        with out.open("ab") as f:
            w = OrderedWriter(f, window=4)
            for seq, r in enumerate(iter_records(inp, skip_lines=done)):
                if seq == stop_after:
                    f.write(b'{"id": "x", "line": ' + str(r.line).encode())  # SIGKILL mid-row
                    return
                if isinstance(r, BadRecord):
                    w.put(seq, error_row(r.line, r.id, r.error, settings=SETTINGS))
                else:
                    w.put(seq, result_row(r, {"answer": r.question.upper()}, settings=SETTINGS))
            w.close()

    run(stop_after=20)
    assert out.read_bytes()[-1:] != b"\n"
    run(stop_after=None)
    rows = read_rows(out)
    assert sorted(r["line"] for r in rows) == expected  # every record exactly once
    by_line = {r["line"]: r for r in rows}
    assert by_line[1] == {"id": "r1", "line": 1, "answer": "Q1?", "settings": SETTINGS}
    assert by_line[7]["error"]["type"] == "invalid_record" and by_line[7]["id"] == 7
    assert scan_output(out, settings_fingerprint=fp).torn_bytes == 0
