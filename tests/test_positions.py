"""--positions original|contiguous: what each gives, against references the engine does not share.

- At ratio 0 every pre-LLM method, in either mode, is exactly ``none`` (same tokens, same log-probabilities).
- ``original``: the engine's greedy tokens and their log-probabilities equal transformers recomputing the whole
  unpruned sequence at every step, with the dropped visual tokens masked out of attention and every token at its
  unpruned position (no KV cache): on Phi-3's longrope, whose factor follows the largest position a row reaches,
  for a mixed batch (padding) whose rows cross the threshold at different points.
- ``contiguous``: the same reference with the dropped tokens removed and positions 0..n-1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_rope_scaling import NEW, THRESHOLD, phi3, requests  # noqa: F401 (phi3 is a fixture)
from tiny_random import IMG, synthetic_request, tiny_model

from ptp_cli.loading import LoadedModel
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.pruning.downsample import pool_groups
from ptp_cli.run.engine import Engine
from ptp_cli.run.positions import unpruned_positions
from ptp_cli.run.vision_cache import VisionCache

PRE_LLM = ["ptp", "random", "spatial", "pool", "tiles"]


def test_ratio_zero_equals_none_exactly():
    """Every pre-LLM method in either mode, on a padded batch of 1 and 3 tiles."""
    model = tiny_model(3)
    reqs = [synthetic_request(t, 5, gen_seed=i, head=4, gap=2, tail=3, max_new_tokens=3)
            for i, t in enumerate([1, 3])]
    cache = VisionCache()  # the ViT runs once per image for all the engines below (ptp's layer first: it serves all)
    first = make_method(PruneConfig(method="ptp", ratio=0.0, vit_layer=1, llm_layer=0), model.cfg)
    Engine(model, image_token_id=IMG, method=first, vision_cache=cache).encode_images(reqs)
    none = Engine(model, image_token_id=IMG, vision_cache=cache).generate(reqs)
    for method in PRE_LLM:
        for mode in ("original", "contiguous"):
            prune = PruneConfig(method=method, ratio=0.0, positions=mode, vit_layer=1, llm_layer=0)
            method_ = make_method(prune, model.cfg)
            got = Engine(model, image_token_id=IMG, method=method_, vision_cache=cache).generate(reqs)
            for a, b in zip(none, got, strict=True):
                assert (a.tokens, a.logprobs, a.visual_after) == (b.tokens, b.logprobs, b.visual_after), (method, mode)


def test_unpruned_positions_keep_gaps_and_text():
    kept = torch.tensor([0, 3, 7])
    pos = unpruned_positions(prompt_len=14, image_start=2, num_visual=8, kept=kept)
    assert pos.tolist() == [0, 1, 2, 5, 9, 10, 11, 12, 13]


def _reference(ours: LoadedModel, ref: torch.nn.Module, req, kept: list[int], *, original: bool):
    """transformers on the whole unpruned sequence, the dropped visual tokens masked out of attention (a 2-D mask
    with zeros there) and explicit positions (the unpruned ones; ``original=False``: the dropped tokens removed
    and 0..n-1), then greedy steps on its own KV cache, each at the next position: tokens and log-probabilities.
    (Its first step is a full recompute; later ones reuse the cache, as any cached decoder, so longrope's keys keep
    the factor they were rotated with, as in transformers' own generate.)"""
    from transformers import DynamicCache

    ref = copy.deepcopy(ref)
    n = req.num_tiles * 256
    with torch.no_grad():
        feats = ours.model.vision_features(req.pixel_values).features.flatten(0, 1)  # [T*256, D]
        emb = ref.get_input_embeddings()(torch.tensor(req.ids))  # [S, D]
        emb[req.image_start : req.image_start + n] = feats
        keep = torch.ones(len(req.ids), dtype=torch.bool)
        keep[req.image_start : req.image_start + n] = False
        keep[req.image_start + torch.tensor(kept)] = True
        if not original:  # the pruned sequence itself, numbered 0..n-1
            emb, keep = emb[keep], torch.ones(int(keep.sum()), dtype=torch.bool)
        cache, mask, x = DynamicCache(), keep[None].long(), emb[None]
        pos = torch.arange(emb.shape[0])[None]
        tokens, logps = [], []
        for _ in range(NEW):
            out = ref(inputs_embeds=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            t = int(lp.argmax())
            tokens.append(t)
            logps.append(float(lp[t]))
            x = ref.get_input_embeddings()(torch.tensor([[t]]))
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
    return tokens, logps


@pytest.mark.parametrize(("method", "mode"), [
    ("ptp", "original"), pytest.param("random", "contiguous", marks=pytest.mark.slow),
    pytest.param("random", "original", marks=pytest.mark.slow), pytest.param("ptp", "contiguous", marks=pytest.mark.slow),
])
def test_pruned_generation_matches_masked_full_recompute(phi3, method: str, mode: str):  # noqa: F811
    ours, ref = phi3
    reqs = requests(ours)
    lengths = [len(r.ids) for r in reqs]
    assert lengths[1] < THRESHOLD < lengths[1] + NEW and lengths[3] > THRESHOLD
    prune = PruneConfig(method=method, ratio=0.5, vit_layer=1, llm_layer=1, positions=mode)
    engine = Engine(ours.model, image_token_id=ours.image_token_id, method=make_method(prune, ours.cfg))
    for req, got in zip(reqs, engine.generate(reqs), strict=True):
        tokens, logps = _reference(ours, ref, req, got.kept, original=mode == "original")
        assert got.tokens == tokens
        assert max(abs(a - b) for a, b in zip(got.logprobs, logps, strict=True)) < 1e-4


def test_original_positions_change_the_answer_logits(phi3):  # noqa: F811
    """The two modes are not the same computation (else the parity above would prove nothing)."""
    ours, _ = phi3
    req = requests(ours)[3]
    out = {}
    for mode in ("original", "contiguous"):
        prune = PruneConfig(method="random", ratio=0.5, positions=mode)
        engine = Engine(ours.model, image_token_id=ours.image_token_id, method=make_method(prune, ours.cfg))
        out[mode] = engine.generate([req])[0]
    assert out["original"].kept == out["contiguous"].kept
    assert out["original"].logprobs != out["contiguous"].logprobs


@pytest.mark.parametrize("b", [256, 192, 128, 100, 64, 26, 1])
def test_pool_groups_partition_the_tile_into_rectangles(b: int):
    groups = pool_groups(b, 16)
    assert len(groups) == b
    assert sorted(i for g in groups for i in g) == list(range(256))
    for g in groups:
        rows, cols = {i // 16 for i in g}, {i % 16 for i in g}
        assert len(g) == len(rows) * len(cols) and g[0] == min(g)  # a rectangle; its first token is its corner
        assert max(rows) - min(rows) == len(rows) - 1 and max(cols) - min(cols) == len(cols) - 1
    firsts = [g[0] for g in groups]
    assert firsts == sorted(firsts)
    if b == 128:
        assert {len(g) for g in groups} == {2} and groups[0] == [0, 1]  # 2x1
    if b == 64:
        assert groups[0] == [0, 1, 16, 17]  # 2x2


def test_pool_writes_each_groups_mean_at_its_first_token():
    model = tiny_model(1)
    req = synthetic_request(3, 4, gen_seed=5, head=3, gap=1, tail=2, max_new_tokens=2)
    prune = PruneConfig(method="pool", ratio=0.75, positions="original")
    engine = Engine(model, image_token_id=IMG, method=make_method(prune, model.cfg))
    visual = engine.encode_images([req])
    sel = engine.select([req], visual)
    f, merged, keep = visual.features[0], sel.features[0], sel.keep[0]
    assert keep.numel() == 3 * 64
    # tile 1's first 2x2 group: tokens 256, 257, 272, 273
    assert torch.allclose(merged[256], f[[256, 257, 272, 273]].mean(0), atol=1e-6)
    assert 256 in keep.tolist() and 257 not in keep.tolist()
