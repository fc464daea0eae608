"""OpenAI batch files: requests in (as sent to a hosted batch API or to ``vllm run-batch``), results out in the
batch output format, so tooling written for those reads ptp's rows unchanged.

Input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages",
"max_tokens", ...}}``. The one image is an ``image_url`` part (a base64 data URL, a ``file://`` URL or a local
path, relative to the batch file's folder); the question is the text of the last user message. ``max_tokens``
(or ``max_completion_tokens``), ``temperature`` and ``seed`` apply to that request. System messages are not
read: the run's --system-message applies.

Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``; a success has
status 200 and a chat completion body with ``choices`` and ``usage``; a failed record has status 400 (bad
input) or 500 (the engine failed) and ``error: {"code", "message"}``. ptp's own keys ride in fields the format
leaves to the server: ``id`` is ``ptp-<position>`` and ``request_id`` ``ptp-<settings fingerprint>-<position>``,
which is what ``--resume`` reads back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

from ptp_cli.errors import InvalidRecordError, UsageError
from ptp_cli.io.formats.base import Item, data_url_bytes, selected
from ptp_cli.io.records import BadRecord, Record, _json_type, _overrides, fingerprint, iter_lines

_ROW_ID = re.compile(r"ptp-(\d+)")
_REQUEST_ID = re.compile(r"ptp-([0-9a-f]{12})-(\d+)")
_BAD_INPUT = frozenset({"invalid_record", "image_error", "prompt_error", "prompt_too_long"})


class BatchReader:
    """Records of an OpenAI batch file; positions are physical line numbers, as for JSONL."""

    format = "openai"

    def __init__(self, source: str, *, base_dir: str | None) -> None:
        self.source = source
        self.root = Path(base_dir or Path(source).absolute().parent).expanduser().absolute()
        try:
            with open(source, "rb"):  # an unreadable file is a usage error now, before any model loads
                pass
        except OSError as e:
            raise UsageError(f"cannot read input {source}: {e.strerror or e}") from None

    def records(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> Iterator[Item]:
        for line, raw in iter_lines(self.source, shard=shard, skip_lines=skip):
            yield parse_request(raw, line=line, root=self.root)

    def count(self, *, shard: tuple[int, int] | None = None, skip: frozenset[int] = frozenset()) -> int | None:
        with open(self.source, "rb") as f:
            positions = [n for n, raw in enumerate(f, start=1) if raw.strip()]
        return sum(selected(i, p, shard, skip) for i, p in enumerate(positions))


def parse_request(raw: bytes, *, line: int, root: Path) -> Record | BadRecord:
    """One batch line -> a Record (id: its custom_id; extra: its model), or a BadRecord saying what is wrong."""
    try:
        obj = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
    except orjson.JSONDecodeError as e:
        return BadRecord(line, line, InvalidRecordError(f"line is not valid JSON: {e}"))
    if not isinstance(obj, dict):
        return BadRecord(line, line, InvalidRecordError(f"line is a JSON {_json_type(obj)}, not an object"))
    cid = obj.get("custom_id")
    problems: list[str] = []
    if not isinstance(cid, str) or not cid:
        problems.append("custom_id must be a non-empty string")
        cid = line
    body = obj.get("body")
    if not isinstance(body, dict):
        problems.append("body must be an object")
        body = {}
    url = obj.get("url")
    if url is not None and url != "/v1/chat/completions":
        problems.append(f"url {url!r} is not /v1/chat/completions, the only endpoint ptp answers")
    question, images = _messages(body.get("messages"), problems)
    image: Path | bytes | None = None
    if len(images) > 1:
        problems.append(f"the request holds {len(images)} images; ptp answers one image per question")
    elif not images:
        problems.append("the request holds no image_url part")
    else:
        image = _image(images[0], root, problems)
    options = {"max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
               "temperature": body.get("temperature"), "seed": body.get("seed")}
    overrides = _overrides(options, problems)
    extra = {"model": body["model"]} if isinstance(body.get("model"), str) else {}
    if problems:
        return BadRecord(line, cid, InvalidRecordError("; ".join(problems)))
    assert image is not None and question is not None
    return Record(line=line, id=cid, image=image, question=question, overrides=overrides, extra=extra,
                  image_relative=isinstance(image, Path) and not str(images[0]).startswith(("/", "file:")))


def _messages(messages: Any, problems: list[str]) -> tuple[str | None, list[str]]:
    """The last user message's text, and every image URL of the conversation."""
    if not isinstance(messages, list) or not messages:
        problems.append("body.messages must be a non-empty list")
        return None, []
    images: list[str] = []
    question = None
    for m in messages:
        if not isinstance(m, dict):
            problems.append("every message must be an object")
            return None, []
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            continue
        texts = []
        for p in parts:
            if isinstance(p, dict) and p.get("type") == "image_url":
                ref = p.get("image_url")
                images.append(ref.get("url") if isinstance(ref, dict) else ref)
            elif isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                texts.append(p["text"])
        if m.get("role") == "user":
            question = "\n".join(texts).strip()
    if not question:
        problems.append("the last user message has no text (the question)")
        return None, images
    return question, images


def _image(url: Any, root: Path, problems: list[str]) -> Path | bytes | None:
    if not isinstance(url, str) or not url.strip():
        problems.append("image_url.url must be a non-empty string")
        return None
    if url.startswith("data:"):
        try:
            return data_url_bytes(url)
        except ValueError as e:
            problems.append(f"image data URL: {e}")
            return None
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    if "://" in url:
        problems.append("image URLs other than data: and file:// are not supported (download the images first)")
        return None
    return root / Path(url).expanduser()


# ---------------------------------------------------------------------------------------------------------
# Output


def batch_row(row: Mapping[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """A ptp result or error row as a batch output line."""
    line = row.get("line")
    settings = row.get("settings")
    fp = fingerprint(settings) if isinstance(settings, Mapping) else "000000000000"
    request_id = f"ptp-{fp}-{line}"
    out: dict[str, Any] = {"id": f"ptp-{line}", "custom_id": row.get("id")}
    if (err := row.get("error")) is not None:
        status = 400 if err.get("type") in _BAD_INPUT else 500
        error = {"code": err.get("type"), "message": err.get("message")}
        out["response"] = {"status_code": status, "request_id": request_id, "body": {"error": error}}
        out["error"] = error
        return out
    tokens = row.get("tokens") or {}
    prompt, completion = int(tokens.get("prompt") or 0), int(tokens.get("generated") or 0)
    model = row.get("model") or (settings or {}).get("model")
    body = {
        "id": f"chatcmpl-ptp-{line}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": row.get("answer")},
                     "finish_reason": row.get("finish_reason"), "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "system_fingerprint": fp,
    }
    out["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    out["error"] = None
    return out


def read_batch_row(row: dict[str, Any]) -> tuple[int | None, str | None, bool]:
    """(position, settings fingerprint, is an error) of a batch output line ptp wrote; position None when the
    line is not one of ptp's (``--resume`` refuses such a file)."""
    m = _ROW_ID.fullmatch(str(row.get("id")))
    response = row.get("response") if isinstance(row.get("response"), dict) else {}
    rid = _REQUEST_ID.fullmatch(str(response.get("request_id")))
    if m is None or rid is None:
        return None, None, False
    return int(m[1]), rid[1], row.get("error") is not None or response.get("status_code") != 200


def answer_row(row: dict[str, Any]) -> dict[str, Any]:
    """A batch output line as the ptp row ``ptp eval`` and ``ptp show`` read (id, line, answer or error)."""
    line, _, failed = read_batch_row(row)
    out: dict[str, Any] = {"id": row.get("custom_id"), "line": line}
    if failed:
        err = row.get("error") or {}
        out["error"] = {"type": err.get("code"), "message": err.get("message")}
        return out
    body = (row.get("response") or {}).get("body") or {}
    choices = body.get("choices") or [{}]
    out["answer"] = ((choices[0] or {}).get("message") or {}).get("content")
    usage = body.get("usage") or {}
    out["tokens"] = {"prompt": usage.get("prompt_tokens"), "generated": usage.get("completion_tokens")}
    return out
