"""How much of PTP's token score s and instruction score c falls on the objects of synth scenes.

    python -m training.score_mass [--model mini] [--n 24] [--seed 1001] [--max-tiles 6]

Runs PTP through the public pipeline with a method that also notes both score maps, then, per scene, the share
of each score's sum on the object tokens (``training.data.token_truth``: every view, thumbnail included),
averaged over the scenes; beside it the share of the tokens that are object tokens (a score blind to the
objects puts that much there)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig
from ptp_cli.pruning.ptp import PTP
from ptp_cli.run.engine import Engine
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.synth import example, write_benchmark
from ptp_cli.zoo import load_model
from training.data import TOKEN_GRID, token_truth


class NotingPTP(PTP):
    """PTP that also returns both score maps in each row's ``pruning`` notes."""

    def select(self, ctx):
        kept = super().select(ctx)
        for i in range(len(ctx.tiles)):
            ctx.notes[i]["s_map"] = ctx.token_scores[i].float().flatten().tolist()
            ctx.notes[i]["c_map"] = ctx.instruction_scores[i].float().flatten().tolist()
        return kept


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1001)
    ap.add_argument("--max-tiles", type=int, default=6)
    args = ap.parse_args(argv)
    path = write_benchmark(Path(tempfile.mkdtemp()), n=args.n, seed=args.seed, max_tiles=args.max_tiles)
    prune = PruneConfig(method="ptp", ratio=0.5, alpha=0.5)
    config = RunConfig(model=args.model, prune=prune, max_new_tokens=4, batch_size=1, workers=1)
    loaded = load_model(args.model)
    engine = Engine(loaded.model, image_token_id=loaded.image_token_id, method=NotingPTP(prune, loaded.cfg))
    shares: dict[str, list[float]] = {"s": [], "c": [], "objects": []}
    for i, row in enumerate(Pipeline(loaded, config, engine=engine).infer(iter_records(path))):
        s, c = np.array(row["pruning"]["s_map"]), np.array(row["pruning"]["c_map"])
        _, _, where = token_truth(example(args.seed, i, max_tiles=args.max_tiles).scene, len(s) // TOKEN_GRID**2)
        objects = sorted({j for w in where for j in w})
        shares["s"].append(s[objects].sum() / s.sum())
        shares["c"].append(c[objects].sum() / c.sum())
        shares["objects"].append(len(objects) / len(s))
    print(json.dumps({"scenes": len(shares["s"]), **{f"{k}_share": round(float(np.mean(v)), 4)
                                                       for k, v in shares.items()}}))


if __name__ == "__main__":
    main()
