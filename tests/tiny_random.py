"""A tiny random-weight InternVL built in-process (real tiling geometry, tiny widths) for engine tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import orjson
import torch
from PIL import Image

from ptp_cli.builders.tiny import TINY
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.run.engine import Engine, Request

# The in-process unit tests keep the narrow LLM (D 64, heads 16 wide) their hand counts and std-0.2 init were
# made for; the built-in tiny checkpoint is wider (heads 32 wide, for vLLM) and is tested through its files.
CFG = replace(TINY, llm=replace(TINY.llm, vocab_size=300, hidden_size=64, intermediate_size=128))
IMG = 299  # the image placeholder id the tests' requests use


def tiny_model(seed: int = 0) -> InternVLModel:
    """Seeded normal weights, std 0.2: large enough that greedy tokens differ between inputs."""
    model = InternVLModel(CFG)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2, generator=gen)
    return model.eval()


def synthetic_request(
    tiles: int, question: int, *, gen_seed: int, head: int, gap: int, tail: int, **kw
) -> Request:
    """Random ids around the placeholders: head ids, IMG x 256*tiles, gap ids, the question, tail ids."""
    gen = torch.Generator().manual_seed(gen_seed)

    def text(n: int) -> list[int]:
        return torch.randint(1, 290, (n,), generator=gen).tolist()

    start = text(head)
    ids = start + [IMG] * (256 * tiles) + text(gap)
    q0 = len(ids)
    ids += text(question)
    q1 = len(ids)
    ids += text(tail)
    return Request(
        ids=ids, pixel_values=torch.randn(tiles, 3, 448, 448, generator=gen), image_start=len(start),
        instruction=(q0, q1), ignore_eos=True, has_thumbnail=tiles > 1, **kw,
    )


def forced_logits(engine: Engine, requests: list[Request], tokens: torch.Tensor) -> list[torch.Tensor]:
    """The engine's next-token logits [B, V] before each of the tokens [B, n] it is fed (prefill, then one cached
    decoding step per token but the last), every stage unpruned: n logits, each row following the given tokens."""
    visual = engine.encode_images(requests)
    prompts = engine.build_prompts(requests, visual.features, [None] * len(requests))
    state = engine.prefill(prompts, room=tokens.shape[1])
    out = [state.logits]
    for t in tokens.unbind(1)[:-1]:
        engine.step(state, t)
        out.append(state.logits)
    return out


def image_records(folder: Path, sizes: list[tuple[int, int]], *, inserts: dict[int, bytes] | None = None) -> Path:
    """``folder/q.jsonl``: one record per size (a flat image of that size, a question of growing length), with
    the raw ``inserts`` lines placed at their indices (bad records, say)."""
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (30 * i % 256, 90, (200 - 25 * i) % 256)).save(folder / f"{i}.png")
        lines.append(orjson.dumps({"id": f"r{i}", "image": f"{i}.png", "question": "What colour" + "?" * i}))
    for at, raw in sorted((inserts or {}).items()):
        lines.insert(at, raw)
    (folder / "q.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "q.jsonl"
