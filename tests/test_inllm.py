"""In-LLM baselines (FastV, VTW, PyramidDrop) against a naive reference, and their FLOPs.

The reference recomputes the whole sequence at every decoding step, without a KV cache, from the model's
weights with explicit softmax attention: every layer runs on all tokens, and a key mask hides the tokens a
method dropped at the layers after the drop (kept tokens keep their original positions; generated tokens
are always visible). Its drop decisions are made from its own attention probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_random import CFG, IMG, synthetic_request, tiny_model

from ptp_cli.models.internvl import InternVLModel
from ptp_cli.models.llm import DecoderLayer
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.engine import Engine, Request, Result

STEPS = 5  # generated tokens: the prefill's plus 4 decoding steps


def make_request(tiles: int, question: int) -> Request:
    return synthetic_request(tiles, question, gen_seed=100 * tiles + question, head=4, gap=2, tail=2,
                             max_new_tokens=STEPS)


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    return tiny_model()


@pytest.fixture(scope="module")
def requests_() -> list[Request]:
    return [make_request(2, 5), make_request(1, 9)]


@pytest.fixture(scope="module")
def prompts(model, requests_) -> list[torch.Tensor]:
    """Each request's embedded prompt [P, D]: token embeddings with the visual features written over the
    placeholders (computed once; the ViT is not what these tests are about)."""
    out = []
    with torch.no_grad():
        for req in requests_:
            x = model.language_model.tok_embeddings(torch.tensor(req.ids))
            feats = model.vision_features(req.pixel_values).features.flatten(0, 1)  # [N, D]
            x[req.image_start : req.image_start + feats.shape[0]] = feats
            out.append(x)
    return out


# ---------------------------------------------------------------------------------------------- reference


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE: x [H, S, hd], pos [S]."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float32) / half)  # 1 / theta^(2i / hd)
    ang = pos.float()[:, None] * inv  # [S, hd/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_layer(layer: DecoderLayer, x: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer on x [S, D] where only ``alive`` keys [S] can be attended; returns (x, probs [H, S, S])."""
    c = CFG.llm
    s, hq, hkv, hd = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
    pos = torch.arange(s)
    h = layer.attention_norm(x)
    q, k, v = (h @ layer.attention.wqkv.weight.T).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
    q = rope(q.view(s, hq, hd).transpose(0, 1), pos, c.rope_theta)  # [Hq, S, hd]
    k = rope(k.view(s, hkv, hd).transpose(0, 1), pos, c.rope_theta).repeat_interleave(hq // hkv, 0)
    v = v.view(s, hkv, hd).transpose(0, 1).repeat_interleave(hq // hkv, 0)
    allowed = (pos[None, :] <= pos[:, None]) & alive[None, :]
    allowed |= torch.eye(s, dtype=torch.bool)  # a dropped query still sees itself (its output is never used)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, -math.inf).softmax(-1)
    x = x + (probs @ v).transpose(0, 1).reshape(s, hq * hd) @ layer.attention.wo.weight.T
    return x + layer.feed_forward(layer.ffn_norm(x)), probs


def top(scores: list[float], candidates: list[int], k: int) -> set[int]:
    """The k best candidates, ties to the lower index."""
    return set(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


def drops(cfg: PruneConfig) -> dict[int, str]:
    """0-based layer after which the reference drops, and what it does there."""
    if cfg.method == "fastv":
        return {cfg.fastv_layer - 1: "fastv"}
    if cfg.method == "vtw":
        return {(cfg.vtw_layer or CFG.llm.num_layers // 2) - 1: "vtw"}
    layers = cfg.pdrop_layers or (1, 2, 3)  # 1/4, 2/4, 3/4 of 4 layers
    return {k - 1: "pdrop" for k in layers}


@torch.no_grad()
def reference(
    model: InternVLModel, req: Request, prompt: torch.Tensor, cfg: PruneConfig
) -> tuple[list[int], list[float], list[int]]:
    """Greedy tokens, their log-probabilities, and the prompt tokens each layer saw. prompt: [P, D]."""
    lm = model.language_model
    n_vis = 256 * req.num_tiles
    p = prompt.shape[0]
    visual = set(range(req.image_start, req.image_start + n_vis))
    plan = drops(cfg)
    tokens: list[int] = []
    logps: list[float] = []
    lengths: list[int] = []
    for _ in range(STEPS):
        x = torch.cat([prompt, lm.tok_embeddings(torch.tensor(tokens, dtype=torch.long))])  # [S, D]
        alive = torch.ones(x.shape[0], dtype=torch.bool)
        lengths = []
        for j, layer in enumerate(lm.layers):
            lengths.append(int(alive[:p].sum()))
            x, probs = ref_layer(layer, x, alive)
            if j not in plan or j + 1 == len(lm.layers):
                continue
            heads = probs.mean(0)  # [S, S]
            live_vis = [i for i in sorted(visual) if alive[i]]
            if plan[j] == "fastv":  # mean attention received from every prompt token
                received = heads[:p, :p].mean(0).tolist()
                keep = top(received, live_vis, round((1 - cfg.ratio) * len(live_vis)))
            elif plan[j] == "vtw":
                keep = set()
            else:  # pdrop: the last prompt token's row
                keep = top(heads[p - 1, :p].tolist(), live_vis, round(cfg.pdrop_keep * len(live_vis)))
            for i in live_vis:
                alive[i] = i in keep
        logits = lm.output(lm.norm(x[-1])).float()
        logp = logits.log_softmax(-1)
        tok = int(logits.argmax())
        tokens.append(tok)
        logps.append(float(logp[tok]))
    return tokens, logps, lengths


CASES = [
    PruneConfig(method="fastv", ratio=0.5),
    PruneConfig(method="fastv", ratio=0.3, fastv_layer=1),
    PruneConfig(method="vtw"),
    PruneConfig(method="pdrop"),
    PruneConfig(method="pdrop", pdrop_layers=(2, 3), pdrop_keep=0.3),
]


def run(model: InternVLModel, cfg: PruneConfig | None, reqs: list[Request]) -> list[Result]:
    method = make_method(cfg, CFG) if cfg is not None else None
    return Engine(model, image_token_id=IMG, method=method).generate(reqs)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-{c.ratio}-{c.fastv_layer}-{c.vtw_layer}-{c.pdrop_layers}")
def test_matches_naive_reference(model, requests_, prompts, cfg):
    batch = run(model, cfg, requests_)  # a right-padded batch of two lengths
    for req, prompt, got in zip(requests_, prompts, batch, strict=True):
        tokens, logps, lengths = reference(model, req, prompt, cfg)
        assert got.layer_lengths == lengths
        assert got.tokens == tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(logps), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- FLOPs


def hand_prefill(lengths: list[int]) -> int:
    """Tiny LLM by hand: D 64, 4 q heads x 16, 2 kv heads, SwiGLU 128, vocab 300; 2 FLOPs per multiply-add."""
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate, up, down
    pair = 2 * 2 * 4 * 16  # QK^T and AV for one (query, key) pair
    return sum(n * per_token + pair * n * (n + 1) // 2 for n in lengths) + 2 * 64 * 300  # + LM head once


def hand_decode(lengths: list[int], steps: int) -> int:
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    pair = 2 * 2 * 4 * 16
    total = 0
    for t in range(steps):  # step t attends its layer's prefill cache, the t earlier steps and itself
        total += sum(per_token + pair * (n + t + 1) for n in lengths) + 2 * 64 * 300
    return total


def test_flops_follow_layer_lengths(model, requests_):
    req = requests_[0]
    (none,) = run(model, None, [req])
    (fastv,) = run(model, PruneConfig(method="fastv", ratio=0.5), [req])
    (vtw,) = run(model, PruneConfig(method="vtw"), [req])
    (pdrop,) = run(model, PruneConfig(method="pdrop"), [req])
    p, n_vis = len(req.ids), 512
    assert none.layer_lengths == [p] * 4
    assert fastv.layer_lengths == [p, p, p - 256, p - 256]  # layers 0, 1 see everything; 256 of 512 kept
    assert vtw.layer_lengths == [p, p, p - n_vis, p - n_vis]
    assert pdrop.layer_lengths == [p, p - 256, p - 384, p - 448]  # 512 -> 256 -> 128 -> 64
    for r in (none, fastv, vtw, pdrop):
        assert r.kept == list(range(n_vis))  # pre-LLM: nothing dropped before the LLM
        assert r.flops["prefill"] == hand_prefill(r.layer_lengths)
        assert r.flops["decode"] == hand_decode(r.layer_lengths, STEPS - 1)
        assert r.flops["probe"] == 0
    # The reference comparison can fail: what is dropped moves the log-probabilities far beyond its 1e-4.
    for a, b in ((none, fastv), (fastv, vtw), (vtw, pdrop)):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) > 1e-3
    saved = hand_prefill([p] * 4) - hand_prefill([p, p, p - 256, p - 256])
    assert none.flops["prefill"] - fastv.flops["prefill"] == saved > 0
    assert none.flops["vit"] == fastv.flops["vit"]
