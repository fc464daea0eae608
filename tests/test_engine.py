"""The batched engine against a naive reference (full recompute, no KV cache) on a tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_random import IMG, forced_logits, tiny_model

from ptp_cli.models.internvl import InternVLModel
from ptp_cli.run.engine import Engine, Request

STOP = 2


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    return tiny_model()


def make_request(tiles: int, *, question: int = 5, seed: int = 0, **kw) -> Request:
    g = torch.Generator().manual_seed(1000 * tiles + question)
    prefix = [1, 5, 6, 7]
    q = torch.randint(10, 250, (question,), generator=g).tolist()
    ids = [*prefix, *([IMG] * (256 * tiles)), 8, *q, 9, 10]
    start = len(prefix) + 256 * tiles + 1
    return Request(
        ids=ids, pixel_values=torch.randn(tiles, 3, 448, 448, generator=g), image_start=len(prefix),
        instruction=(start, start + question), stop_ids=kw.pop("stop_ids", [STOP]),
        max_new_tokens=kw.pop("max_new_tokens", 6), seed=seed, **kw,
    )


def reference_greedy(model: InternVLModel, req: Request, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by recomputing the whole sequence every step (no cache, no padding)."""
    lm = model.language_model
    with torch.no_grad():
        feats = model.vision_features(req.pixel_values).features.flatten(0, 1)
        x = lm.tok_embeddings(torch.tensor(req.ids))
        x[req.image_start : req.image_start + feats.shape[0]] = feats
        toks, lps = [], []
        for _ in range(steps):
            s = x.shape[0]
            h = lm.run_layers(x[None], torch.arange(s)[None], torch.ones(1, s, dtype=torch.bool))
            logits = lm.logits(h[:, -1])[0]
            t = int(logits.argmax())
            toks.append(t)
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            x = torch.cat([x, lm.tok_embeddings(torch.tensor([t]))])
    return toks, lps


def test_greedy_matches_full_recompute(model):
    req = make_request(3, stop_ids=[], max_new_tokens=6)
    (res,) = Engine(model, image_token_id=IMG).generate([req])
    toks, lps = reference_greedy(model, req, 6)
    assert res.tokens == toks
    assert res.logprobs == pytest.approx(lps, abs=1e-4)
    assert res.finish_reason == "length"
    assert res.visual_before == res.visual_after == 3 * 256
    assert res.prompt_tokens == len(req.ids)


def test_cached_decode_logits_match_full_recompute(model):
    """Every decoding step's logits (right-padded batch of different prompt lengths, per-layer KV caches, the
    grouped decode attention) equal a no-cache recompute of that row's whole sequence alone, in fp32."""
    reqs = [make_request(1, question=3), make_request(2, question=12), make_request(1, question=30)]
    engine = Engine(model, image_token_id=IMG)
    steps = 6
    tokens = torch.randint(0, 290, (len(reqs), steps), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = forced_logits(engine, reqs, tokens)  # steps x [B, V]
        lm = model.language_model
        worst = 0.0
        for i, req in enumerate(reqs):
            feats = model.vision_features(req.pixel_values).features.flatten(0, 1)
            x = lm.tok_embeddings(torch.tensor(req.ids))
            x[req.image_start : req.image_start + feats.shape[0]] = feats
            for j in range(steps):
                s = x.shape[0]
                h = lm.run_layers(x[None], torch.arange(s)[None], torch.ones(1, s, dtype=torch.bool))
                expected = lm.logits(h[0, -1])  # [V]
                assert expected.std() > 0.1
                worst = max(worst, (got[j][i] - expected).abs().max().item())
                x = torch.cat([x, lm.tok_embeddings(tokens[i, j : j + 1])])
    assert worst < 1e-5


def test_batch_of_mixed_tile_counts_equals_each_alone(model):
    reqs = [make_request(1, question=3), make_request(3, question=8), make_request(7, question=5)]
    engine = Engine(model, image_token_id=IMG, vit_batch=4)  # several ViT chunks too
    batch = engine.generate(reqs)
    for req, got in zip(reqs, batch, strict=True):
        (alone,) = engine.generate([req])
        assert got.tokens == alone.tokens
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert got.batch_size == 3 and alone.batch_size == 1
    assert len({tuple(r.tokens) for r in batch}) > 1, "degenerate model: every sample gave the same tokens"


def test_stop_token_ends_generation_and_is_not_returned(model):
    engine = Engine(model, image_token_id=IMG)
    free = engine.generate([make_request(1, stop_ids=[], max_new_tokens=4)])[0]
    stopped = engine.generate([make_request(1, stop_ids=[free.tokens[2]], max_new_tokens=4)])[0]
    cut = free.tokens.index(free.tokens[2])
    assert stopped.tokens == free.tokens[:cut]
    assert stopped.finish_reason == "stop"
    ignored = engine.generate([make_request(1, stop_ids=[free.tokens[2]], max_new_tokens=4, ignore_eos=True)])[0]
    assert ignored.tokens == free.tokens


def test_per_request_max_new_tokens_in_one_batch(model):
    reqs = [make_request(1, stop_ids=[], max_new_tokens=2), make_request(2, stop_ids=[], max_new_tokens=5)]
    a, b = Engine(model, image_token_id=IMG).generate(reqs)
    assert (len(a.tokens), len(b.tokens)) == (2, 5)
    assert a.finish_reason == b.finish_reason == "length"


def test_sampling_is_seeded(model):
    engine = Engine(model, image_token_id=IMG)

    def sample(seed: int) -> list[int]:
        return engine.generate([make_request(1, stop_ids=[], seed=seed, temperature=1.5, max_new_tokens=8)])[0].tokens

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in range(4)}) > 1
    # A sampled request beside a greedy one: the greedy one is unaffected.
    greedy = engine.generate([make_request(2, stop_ids=[])])[0].tokens
    pair = engine.generate([make_request(1, stop_ids=[], seed=3, temperature=1.5), make_request(2, stop_ids=[])])
    assert pair[1].tokens == greedy


def test_placeholder_count_is_checked(model):
    req = make_request(2)
    bad = dataclasses.replace(req, ids=[t if i != req.image_start + 5 else 11 for i, t in enumerate(req.ids)])
    with pytest.raises(ValueError, match="placeholders"):
        Engine(model, image_token_id=IMG).generate([bad])


def test_flops_and_timing_reported(model):
    (res,) = Engine(model, image_token_id=IMG).generate([make_request(2, stop_ids=[], max_new_tokens=3)])
    assert set(res.timing) == {"vit", "probe", "prefill", "decode"}
    assert all(v >= 0 for v in res.timing.values())
    assert res.flops["total"] == res.flops["vit"] + res.flops["probe"] + res.flops["prefill"] + res.flops["decode"]
    assert res.layer_lengths == [len(make_request(2).ids)] * model.cfg.llm.num_layers


def test_a_shared_vision_cache_changes_no_result_and_runs_the_vit_once_per_image_and_layer(model):
    """The eval grid's engines share one VisionCache: results equal uncached engines', for a method that reads
    no ViT attention and for PTP (which reads layer 11's); each image runs once per score layer."""
    from ptp_cli.pruning import PruneConfig, make_method
    from ptp_cli.run.vision_cache import VisionCache

    reqs = [make_request(t, stop_ids=[], max_new_tokens=3) for t in (1, 3, 2)]
    cache = VisionCache()
    for prune in (PruneConfig(method="random", ratio=0.5), PruneConfig(method="ptp", ratio=0.5),
                  PruneConfig(method="ptp", ratio=0.75)):
        method = make_method(prune, model.cfg)
        plain = Engine(model, image_token_id=IMG, method=method).generate(reqs)
        cached = Engine(model, image_token_id=IMG, method=method, vision_cache=cache).generate(reqs)
        again = Engine(model, image_token_id=IMG, method=method, vision_cache=cache).generate(reqs[::-1])[::-1]
        for a, b, c in zip(plain, cached, again, strict=True):
            assert a.tokens == b.tokens == c.tokens
            assert a.kept == b.kept == c.kept
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    # random: 3 misses then 3 hits; ptp@0.5: 3 misses (no layer-11 attention yet) then 3 hits; ptp@0.75: 6 hits
    assert (cache.misses, cache.hits, len(cache)) == (6, 12, 3)
