"""How much ``--engine vllm`` gains from queueing batches in vLLM while ptp encodes and prunes the next ones.

    python scripts/vllm_overlap.py [--model mini] [--records 48] [--batch-size 4] [--new-tokens 24] [--repeats 3]

Runs in a Python with vLLM. One model, one vLLM (prefix caching off), one ptp pipeline per run over the same
records (the bundled samples, each question made unique): batches left in flight 0 (one batch at a time, as
before) and 2 (the default), alternating, after one warm-up round of each. Prints one JSON line: the wall time
of every run, samples/s medians, the paired ratios (in flight 0 / in flight 2, round by round), and whether
both gave the same answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.run.vllm_engine import VLLMEngine, VLLMGenerator, free_unused_layers

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
DEPTHS = (0, 2)


def records(n: int, out: Path) -> Path:
    """``n`` records cycling through the samples that have an image, each question prefixed with its number (no
    two prompts alike, so nothing is served from a cache)."""
    src = [orjson.loads(line) for line in (SAMPLES / "questions.jsonl").read_bytes().splitlines()]
    src = [r for r in src if (SAMPLES / r["image"]).is_file()]
    rows = []
    for i in range(n):
        r = dict(src[i % len(src)], id=f"q{i}")
        r["image"], r["question"] = str(SAMPLES / r["image"]), f"({i}) {r['question']}"
        rows.append(orjson.dumps(r))
    out.write_bytes(b"\n".join(rows) + b"\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ptp-overlap-"))
    path = records(a.records, tmp / "in.jsonl")
    config = RunConfig(model=a.model, engine="vllm", max_new_tokens=a.new_tokens, batch_size=a.batch_size,
                       prune=PruneConfig(method="ptp", ratio=a.ratio))
    first = Pipeline.load(RunConfig(model=a.model, prune=config.prune))  # loads the weights once
    loaded = first.loaded
    generator = VLLMGenerator(loaded.model, view_dir=tmp / "view", seed=config.seed,
                              enforce_eager=loaded.model.device.type == "cpu")
    method = make_method(config.prune, loaded.cfg)
    free_unused_layers(loaded.model, [method])
    engine = VLLMEngine(loaded.model, image_token_id=loaded.image_token_id, method=method, generator=generator)
    walls: dict[int, list[float]] = {d: [] for d in DEPTHS}
    answers: dict[int, list] = {}
    for round_ in range(a.repeats + 1):  # round 0 warms both up
        for depth in DEPTHS:
            pipeline = Pipeline(loaded, config, engine=engine, in_flight=depth, checked=True)
            t0 = time.perf_counter()
            rows = list(pipeline.infer(iter_records(path)))
            wall = time.perf_counter() - t0
            answers[depth] = [r.get("answer") for r in rows]
            if round_:
                walls[depth].append(wall)
    print(json.dumps({
        "model": a.model, "device": str(loaded.model.device), "records": a.records, "batch_size": a.batch_size,
        "new_tokens": a.new_tokens, "walls_s": {str(d): w for d, w in walls.items()},
        "samples_per_s_median": {str(d): a.records / statistics.median(w) for d, w in walls.items()},
        "speedup_in_flight_2_paired": [x / y for x, y in zip(walls[0], walls[2], strict=True)],
        "same_answers": answers[0] == answers[2],
    }))


if __name__ == "__main__":
    main()
