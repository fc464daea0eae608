"""Write the bundled questions in the other input formats ptp reads (needs pyarrow: pip install 'ptp-cli[parquet]').

    python samples/make_formats.py [OUT_DIR]

From ``questions.jsonl`` and its images: ``questions.parquet`` (images as the Hugging Face ``Image`` struct of
bytes and path), ``questions.hf/`` (a ``datasets`` ``save_to_disk`` folder), ``shards/questions-{0..1}.tar``
(WebDataset) and ``batch.jsonl`` (OpenAI batch requests, images as data URLs). A record whose image is missing
stays in each, so each format shows its error row. The tests build their own files with these functions.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def read_jsonl(path: Path) -> list[Record]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _bytes(record: Record, root: Path) -> bytes | None:
    path = root / record["image"]
    return path.read_bytes() if path.is_file() else None


def _others(record: Record) -> Record:
    return {k: v for k, v in record.items() if k not in ("image", "question", "id")}


def table(records: list[Record], root: Path, *, image: str = "struct") -> Any:
    """A pyarrow table of the records: id, question, image (``bytes``, ``struct`` {bytes, path} or ``path``),
    then their other fields."""
    import pyarrow as pa

    def cell(r: Record) -> Any:
        data = _bytes(r, root)
        if image == "bytes":
            return data
        if image == "path":
            return r["image"]
        return {"bytes": data, "path": r["image"]}

    columns: dict[str, list[Any]] = {"id": [r["id"] for r in records], "question": [r["question"] for r in records],
                                     "image": [cell(r) for r in records]}
    for name in dict.fromkeys(k for r in records for k in _others(r)):
        columns[name] = [r.get(name) for r in records]
    return pa.table(columns)


def write_parquet(records: list[Record], root: Path, path: Path, *, image: str = "struct", row_group_size: int = 64) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(table(records, root, image=image), path, row_group_size=row_group_size)
    return path


def write_hf_folder(records: list[Record], root: Path, folder: Path) -> Path:
    """What ``datasets.Dataset.save_to_disk`` writes for these records: one Arrow IPC stream file, plus
    ``dataset_info.json`` (the features, ``image`` an ``Image``) and ``state.json`` (the file list)."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    data = table(records, root, image="struct")
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, data.schema) as writer:
        for batch in data.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    features = {c: {"dtype": "string", "_type": "Value"} for c in data.column_names}
    features["image"] = {"_type": "Image"}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}, indent=2))
    state = {"_data_files": [{"filename": name}], "_fingerprint": "ptp-sample", "_format_type": None,
             "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    return folder


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(records: list[Record], root: Path, folder: Path, *, shards: int = 2) -> list[Path]:
    """WebDataset shards ``questions-0.tar`` ...: per record ``KEY.png`` (absent when the image is) and
    ``KEY.json`` with its id, question and other fields; records dealt to the shards in contiguous runs."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(records) // shards)
    paths = []
    for s in range(shards):
        path = folder / f"questions-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i, r in enumerate(records[s * per:(s + 1) * per], start=s * per):
                key = f"{i:06d}"
                if (data := _bytes(r, root)) is not None:
                    _add(tar, f"{key}.{Path(r['image']).suffix.lstrip('.') or 'png'}", data)
                _add(tar, f"{key}.json", json.dumps({"id": r["id"], "question": r["question"], **_others(r)}).encode())
        paths.append(path)
    return paths


def batch_line(record: Record, root: Path, *, model: str = "ptp", max_tokens: int | None = None) -> Record:
    """One OpenAI batch request: the image as a data URL (or its path when the file is missing)."""
    data = _bytes(record, root)
    url = f"data:image/png;base64,{base64.b64encode(data).decode()}" if data is not None else record["image"]
    body: Record = {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": record["question"]}]}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return {"custom_id": str(record["id"]), "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_batch(records: list[Record], root: Path, path: Path, **kwargs: Any) -> Path:
    path.write_text("".join(json.dumps(batch_line(r, root, **kwargs)) + "\n" for r in records))
    return path


def main(out_dir: Path) -> None:
    here = Path(__file__).resolve().parent
    records = read_jsonl(here / "questions.jsonl")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(records, here, out_dir / "questions.parquet")
    write_hf_folder(records, here, out_dir / "questions.hf")
    write_shards(records, here, out_dir / "shards")
    write_batch(records, here, out_dir / "batch.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
