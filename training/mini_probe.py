"""Probe a ptp-mini stage-2 run link by link: where the naming tokens' grounding attention lands, what the carry
read-outs recover, whether the answer reads the naming tokens, and the answers, per question type.

    python -m training.mini_probe runs/mini [--scenes 12] [--min-tiles 2] [--max-tiles 12]

Scenes come from the held-out seed (1000) with their extra questions (a probe, not an accuracy measure)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptp_cli.synth import example, more_questions
from ptp_cli.text.prompts import get_template
from ptp_cli.text.tokenization import load_tokenizer
from training.data import TOKEN_GRID, make_sample
from training.evaluate import EVAL_SEED
from training.readouts import CarryHeads, attention_loss
from training.train import (
    STATE,
    TrainConfig,
    ground_targets,
    row_types,
    sequence_inputs,
    view_objects,
)
from training.weights import new_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--min-tiles", type=int, default=2)
    ap.add_argument("--max-tiles", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    state = torch.load(args.run / STATE, weights_only=False)
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})
    tokenizer = load_tokenizer(args.run / "tokenizer")
    model = new_model(args.run / "tokenizer", seed=cfg.seed, vit_width=cfg.vit_width)
    model.load_state_dict(state["model"])
    model.eval()
    carry = CarryHeads.for_run(model.cfg.llm.hidden_size, cfg)
    carry.load_state_dict(state["carry"])
    template = get_template(model.cfg.template)
    lm = model.language_model
    stats: dict[str, list[float]] = {}

    def add(key: str, value) -> None:
        stats.setdefault(key, []).append(float(value))

    def mass(h, pos, rows, targets, layer, head=None) -> float:
        return float(torch.exp(-attention_loss(lm, h, pos, rows, targets, layer=layer, head=head)))

    with torch.no_grad():
        for i in range(args.scenes):
            ex = example(EVAL_SEED, i, min_tiles=args.min_tiles, max_tiles=args.max_tiles)
            extra = more_questions(ex.scene, np.random.default_rng(i), cfg.extra_questions)
            s = make_sample(ex, extra, tokenizer=tokenizer, template=template, cfg=model.cfg)
            h, pos, cos, sin, valid = sequence_inputs(model, s)
            kinds = row_types(s)
            rows = [r for rs in s.naming_rows for r in rs]
            for layer, block in enumerate(lm.layers):
                if layer == cfg.ground_layer and carry.token_place is not None:
                    index = view_objects(s)
                    at = s.image_start + (s.pixel_values.shape[0] - 1) * TOKEN_GRID**2 + index
                    got = carry.token_place(F.rms_norm(h[0, at], (h.shape[-1],))).view(-1, 2, TOKEN_GRID).argmax(-1)
                    want = torch.stack([index // TOKEN_GRID, index % TOKEN_GRID], 1)
                    for ok in ((got - want).abs() <= 1).all(1):
                        add("token place read-out, both within 1", ok)
                if layer == cfg.ground_layer:
                    asked = dict(ground_targets(s, cfg))
                    for r, k in zip(rows, kinds, strict=True):
                        if r in asked:
                            add(f"ground mass / {k}", mass(h, pos, [r], [torch.tensor(asked[r])], layer))
                if layer == cfg.ground_layer + 1:
                    hn = F.rms_norm(h[0], (h.shape[-1],))  # [S, D]
                    for r, p, k in zip(rows, s.named_place, kinds, strict=True):
                        if p is not None and k == "position":
                            got = carry.place(hn[r]).view(2, cfg.place_bins).argmax(-1)
                            want = (torch.tensor(p) * cfg.place_bins).long().clamp(0, cfg.place_bins - 1)
                            add("place read-out, both bins within 1", ((got - want).abs() <= 1).all())
                            add("place read-out, column bin exact", got[0] == want[0])
                    for q_rows, k, a in zip(s.naming_rows, s.types, s.labels[s.answer_rows], strict=True):
                        if k == "position":  # the answer the two read-out places give (bins, canvas axes)
                            (ax, ay), (bx, by) = (carry.place(hn[r]).view(2, cfg.place_bins).argmax(-1).tolist()
                                                  for r in q_rows)
                            word = (("left" if ax < bx else "right") if abs(ax - bx) >= abs(ay - by)
                                    else ("above" if ay < by else "below"))
                            add("position from the read-out places", tokenizer.token_to_id(word) == int(a))
                    for r, c, k in zip(rows, s.named_count, kinds, strict=True):
                        if k in ("count", "exist"):
                            add(f"count read-out / {k}", carry.count(hn[r]).argmax() == min(c, 4))
                if layer == cfg.route_layer:
                    for a, rs, k in zip(s.answer_rows, s.naming_rows, s.types, strict=True):
                        add(f"route mass head 0 / {k}", mass(h, pos, [a], [torch.tensor(rs[:1])], layer, 0))
                h = block(h, cos, sin, None, valid, causal=True).hidden
            right = lm.logits(h[0, s.answer_rows]).argmax(-1) == s.labels[s.answer_rows]
            for k, ok in zip(s.types, right, strict=True):
                add(f"answer / {k}", ok)
    for key in sorted(stats):
        print(f"{key:40s} n={len(stats[key]):4d} mean={np.mean(stats[key]):.3f}")


if __name__ == "__main__":
    main()
