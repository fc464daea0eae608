"""Does a model read an object's place from sequence distances? Pre-LLM pruning with the kept tokens at
contiguous positions (what ptp does, docs/method.md) against the same kept tokens at their original positions.

    python scripts/position_ids.py [--model mini] [--n 600] [--seed 1000] [--type position] [--ratio 0.5]

A diagnostic, not a method: the engine subclass below only renumbers the RoPE positions of the pruned prompt
(each kept token keeps the index it had in the unpruned prompt, the text after the image keeps its own), so the
kept tokens, their features and the question are the same in both arms. If the answers come back with original
positions, the model locates objects by their distance in the sequence; if not, by what the dropped tokens held.
Prints exact match per run on the questions of ``--type`` (all types with ``--type all``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig
from ptp_cli.run.engine import Engine
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.synth import write_benchmark
from ptp_cli.zoo import load_model


class OriginalPositions(Engine):
    """Pruned prompts whose tokens keep their unpruned positions (gaps where tokens were dropped)."""

    def build_prompts(self, requests, features, keep):
        p = super().build_prompts(requests, features, keep)
        positions = p.positions.clone()
        for i, (r, k) in enumerate(zip(requests, p.kept, strict=True)):
            n, full = features[i].shape[0], torch.arange(len(r.ids), device=positions.device)
            original = torch.cat([full[: r.image_start], full[r.image_start + k.to(full.device)],
                                  full[r.image_start + n:]])  # [S_i] each kept token's unpruned index
            positions[i, : original.numel()] = original
        return dataclasses.replace(p, positions=positions)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--type", default="position")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--methods", default="none,ptp,random,spatial")
    args = ap.parse_args(argv)
    path = write_benchmark(Path(tempfile.mkdtemp()), n=args.n, seed=args.seed)
    records = [r for r in map(json.loads, path.read_text().splitlines()) if args.type in ("all", r["type"])]
    subset = path.with_name("subset.jsonl")
    subset.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_model(args.model)
    results = {}
    for name in args.methods.split(","):
        prune = PruneConfig(method=name, ratio=0.0 if name == "none" else args.ratio, alpha=0.5,
                            positions="contiguous")  # the OriginalPositions arm renumbers on top
        config = RunConfig(model=args.model, prune=prune, max_new_tokens=4, batch_size=8, workers=1)
        arms = [("contiguous", Engine)] + ([("original", OriginalPositions)] if name != "none" else [])
        for arm, cls in arms:
            engine = cls(loaded.model, image_token_id=loaded.image_token_id,
                         method=Pipeline(loaded, config).engine.method)
            rows = list(Pipeline(loaded, config, engine=engine).infer(iter_records(subset)))
            right = [row.get("answer", "").strip().lower() == rec["answer"] for row, rec in zip(rows, records, strict=True)]
            results[f"{name}@{args.ratio}/{arm}" if name != "none" else "none"] = round(100 * sum(right) / len(right), 1)
            print(json.dumps({"run": list(results)[-1], "questions": len(right), "exact_match": results[list(results)[-1]]}),
                  flush=True)


if __name__ == "__main__":
    main()
