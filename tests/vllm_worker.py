"""Runs in a Python that has vLLM (``PTP_VLLM_PYTHON``): ptp's engine and ``--engine vllm`` on the same records,
for every pre-LLM method at several ratios, with one vLLM start; prints what each produced as JSON.

    python tests/vllm_worker.py MODEL_DIR RECORDS.jsonl [--kv-cache-bytes N]

``tests/test_vllm.py`` compares the two engines' greedy ids and error rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.run.vllm_engine import VLLMEngine, VLLMGenerator, free_unused_layers

RUNS = [("none", 0.0, 0.0), ("ptp", 0.0, 0.0), ("ptp", 0.5, 0.0), ("ptp", 0.75, 0.0), ("random", 0.5, 0.0),
        ("random", 0.75, 0.0), ("spatial", 0.5, 0.0), ("spatial", 0.75, 0.0), ("ptp", 0.5, 0.25)]  # last: --vit-prune


def essence(row: dict) -> dict:
    if "error" in row:
        return {"line": row["line"], "error": row["error"]["type"], "details": row["error"]}
    return {"line": row["line"], "ids": row["logprobs"]["ids"], "logprobs": row["logprobs"]["values"],
            "finish": row["finish_reason"], "kept": row["tokens"]["visual_after"], "tiles": row["tokens"]["tiles"],
            "engine": row["settings"].get("engine", "ptp")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("records")
    ap.add_argument("--kv-cache-bytes", type=int, default=None)
    a = ap.parse_args()
    base = RunConfig(model=a.model, max_new_tokens=6, logprobs=True, batch_size=4, max_tiles=4)
    first = Pipeline.load(base)
    loaded = first.loaded
    with tempfile.TemporaryDirectory() as cache:
        generator = VLLMGenerator(loaded.model, view_dir=Path(cache) / "view", enforce_eager=True,
                                  kv_cache_bytes=a.kv_cache_bytes)
        out = {"max_model_len": generator.max_model_len, "runs": []}
        for method, ratio, vit_prune in RUNS:
            config = dataclasses.replace(base, prune=PruneConfig(method=method, ratio=ratio, vit_prune=vit_prune,
                                                                              positions="contiguous"))
            ours = Pipeline(loaded, config)
            # Batches of 2 on vLLM's side: the pipeline queues the next batch while vLLM generates the first.
            theirs = Pipeline(loaded, dataclasses.replace(config, engine="vllm", batch_size=2), engine=VLLMEngine(
                loaded.model, image_token_id=loaded.image_token_id, method=make_method(config.prune, loaded.cfg),
                generator=generator))
            out["runs"].append({
                "method": method, "ratio": ratio, "vit_prune": vit_prune,
                "ptp": [essence(r) for r in ours.infer(iter_records(a.records))],
                "vllm": [essence(r) for r in theirs.infer(iter_records(a.records))],
            })
        # Last, as a run does: ptp keeps only the layers PTP's probe reads; vLLM must answer as before.
        config = dataclasses.replace(base, engine="vllm", prune=PruneConfig(method="ptp", ratio=0.5, positions="contiguous"))
        method = make_method(config.prune, loaded.cfg)
        out["layers_kept"] = free_unused_layers(loaded.model, [method])
        trimmed = Pipeline(loaded, config, engine=VLLMEngine(
            loaded.model, image_token_id=loaded.image_token_id, method=method, generator=generator))
        out["trimmed"] = [essence(r) for r in trimmed.infer(iter_records(a.records))]
        try:
            out["ptp_after_trim"] = [essence(r) for r in Pipeline(loaded, base).infer(iter_records(a.records))]
        except RuntimeError as e:  # a programming error, not a record's failure: it propagates
            out["ptp_after_trim"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
