"""Pruning inside the ViT (``--vit-prune``): block geometry, the pruned ViT against an independent masked
reference, budgets, batching, FLOPs, and the command line on real files."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from ptp_cli.models.internvl import InternVLModel, pixel_shuffle
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.pruning.base import VisualContext
from ptp_cli.pruning.budgets import keep_count
from ptp_cli.pruning.vitprune import fit_budgets, stage1_budgets, stage2_budgets, survivors_per_tile
from ptp_cli.run import flops as F
from ptp_cli.run.engine import Engine
from ptp_cli.run.vision_prune import block_patches, length_groups
from tests.test_cli import FAST, error_line, parse_rows, ptp, write_jsonl
from tests.tiny_random import CFG, IMG, synthetic_request, tiny_model

# ------------------------------------------------------------------------------------------------ geometry


def test_blocks_are_the_patches_pixel_shuffle_merges() -> None:
    blocks = block_patches(32)  # [256, 4]
    for i in range(16):
        for j in range(16):  # PTP.md: token 16i + j is patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
            want = [32 * (2 * i) + 2 * j, 32 * (2 * i) + 2 * j + 1, 32 * (2 * i + 1) + 2 * j, 32 * (2 * i + 1) + 2 * j + 1]
            assert sorted(blocks[16 * i + j].tolist()) == want
    grid = torch.randn(2, 32, 32, 5)
    for version in ("v1", "v2"):
        merged = pixel_shuffle(grid, version=version).flatten(1, 2)  # [2, 256, 20]
        order = block_patches(32, version=version)
        gathered = grid.flatten(1, 2)[:, order].flatten(2)  # each token's patches, concatenated in slot order
        assert torch.equal(merged, gathered)


def test_length_groups_cover_every_tile_once_within_the_slack() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([1025, 1 + 4 * rng.randint(0, 256)]) for _ in range(rng.randint(1, 12))]
        groups = length_groups(lengths, slack=1.25)
        assert sorted(t for g in groups for t in g) == list(range(len(lengths)))
        for g in groups:
            assert max(lengths[t] for t in g) * len(g) <= 1.25 * sum(lengths[t] for t in g) or len(g) == 1
    assert length_groups([9, 9, 9]) == [[0, 1, 2]]


# ------------------------------------------------------------------------------------------------ reference


def _reference_vit(model, pix: torch.Tensor, *, layer: int, kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every patch through every layer, written out by hand; from layer ``layer`` + 1 on, the queries may not
    attend to the patches of dropped tokens (kept: per tile, local token indices). Returns the projected
    features [T, 256, D] of the last layer (those of kept tokens are what counts) and the CLS outputs [T, C]."""
    vit = model.vision_model
    t = pix.shape[0]
    allowed = torch.zeros(t, 1025, dtype=torch.bool)
    allowed[:, 0] = True
    for u, k in enumerate(kept):
        for tok in k.tolist():
            i, j = divmod(tok, 16) if model.cfg.ps_version == "v2" else divmod(tok, 16)[::-1]  # v1: column-major
            for a in (0, 1):
                for b in (0, 1):
                    allowed[u, 1 + 32 * (2 * i + a) + 2 * j + b] = True
    x = vit.embeddings(pix)  # [T, 1025, C]
    c = x.shape[-1]
    for n, blk in enumerate(vit.encoder.layers):
        att = blk.attn
        h = blk.norm1(x)
        q, k, v = att.qkv(h).split(c, dim=-1)
        if att.qk_norm:
            q, k = att.q_norm(q), att.k_norm(k)
        q, k, v = (z.view(t, 1025, att.num_heads, att.head_dim).transpose(1, 2) for z in (q, k, v))
        logits = (q @ k.transpose(-1, -2)) * att.head_dim**-0.5  # [T, H, 1025, 1025]
        if n > layer:
            logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(t, 1025, c)
        x = x + att.proj(a) * blk.ls1
        x = x + blk.mlp(blk.norm2(x)) * blk.ls2
    merged = pixel_shuffle(x[:, 1:].reshape(t, 32, 32, c), version=model.cfg.ps_version)
    return model.mlp1(merged.flatten(1, 2)), x[:, 0]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _requests(tiles: tuple[int, ...], *, max_new_tokens: int = 3):
    return [synthetic_request(t, 5, gen_seed=10 + n, head=3, gap=2, tail=2, max_new_tokens=max_new_tokens, seed=n)
            for n, t in enumerate(tiles)]


def _variant_model() -> InternVLModel:
    """InternViT-6B's options on the tiny model: qk-norm, RMSNorm, and the early (v1, transposed) pixel shuffle."""
    cfg = replace(CFG, vision=replace(CFG.vision, qk_norm=True, norm_type="rms_norm"), ps_version="v1")
    model = InternVLModel(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2, generator=gen)
    return model.eval()


@pytest.mark.parametrize("method", ["ptp", pytest.param("random", marks=pytest.mark.slow),
                                    pytest.param("spatial", marks=pytest.mark.slow),
                                    pytest.param("variant", marks=pytest.mark.slow)])
@torch.inference_mode()
def test_pruned_vit_equals_a_masked_full_reference(model, method: str) -> None:
    layer = 4
    if method == "variant":
        model, method = _variant_model(), "ptp"
    cfg = PruneConfig(method=method, ratio=0.6, vit_prune=0.4, vit_layer=layer, vit_prune_thumbnail=False)
    engine = Engine(model, image_token_id=IMG, method=make_method(cfg, model.cfg))
    reqs = _requests((2,))
    visual = engine.encode_images(reqs)
    assert visual.available is not None
    for r, feats, cls, avail in zip(reqs, visual.features, visual.cls, visual.available, strict=True):
        t = r.num_tiles
        kept = [avail[(avail >= u * 256) & (avail < (u + 1) * 256)] - u * 256 for u in range(t)]
        ref, ref_cls = _reference_vit(model, r.pixel_values, layer=layer, kept=kept)
        got = feats.view(t, 256, -1)
        for u in range(t):
            torch.testing.assert_close(got[u, kept[u]], ref[u, kept[u]], atol=2e-4, rtol=1e-4)
            dropped = torch.ones(256, dtype=torch.bool)
            dropped[kept[u]] = False
            assert not got[u, dropped].any()  # nothing computed for dropped tokens
        torch.testing.assert_close(cls, ref_cls, atol=2e-4, rtol=1e-4)
        if t > 1:  # the thumbnail is not pruned here: all of it runs
            assert kept[-1].numel() == 256


@torch.inference_mode()
def test_blocks_dropped_after_the_last_layer_leave_kept_tokens_unchanged(model) -> None:
    """Stage 1 after the last ViT layer changes no computation: kept tokens' features must be exactly the
    unpruned ones at the same indices (the blocks fed to the projector are the LLM tokens they claim to be)."""
    last = CFG.vision.num_layers - 1
    reqs = _requests((2, 1))
    plain = Engine(model, image_token_id=IMG, method=make_method(PruneConfig(ratio=0.5, vit_layer=last), CFG))
    staged = Engine(model, image_token_id=IMG,
                    method=make_method(PruneConfig(ratio=0.5, vit_layer=last, vit_prune=0.3), CFG))
    a, b = plain.encode_images(reqs), staged.encode_images(reqs)
    for fa, fb, avail in zip(a.features, b.features, b.available, strict=True):
        torch.testing.assert_close(fb[avail], fa[avail], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_vit_prune_zero_is_todays_ptp_exactly(model) -> None:
    reqs = _requests((2, 1), max_new_tokens=2)
    base = Engine(model, image_token_id=IMG, method=make_method(PruneConfig(ratio=0.5, vit_layer=3), CFG))
    zero = Engine(model, image_token_id=IMG, method=make_method(PruneConfig(ratio=0.5, vit_layer=3, vit_prune=0.0), CFG))
    for x, y in zip(base.generate(reqs), zero.generate(reqs), strict=True):
        assert (x.tokens, x.logprobs, x.kept, x.flops) == (y.tokens, y.logprobs, y.kept, y.flops)
        assert "vit_kept" not in y.pruning
    assert zero.method.settings() == base.method.settings()  # earlier outputs still resume


@pytest.mark.parametrize("thumbnail", [pytest.param(True, marks=pytest.mark.slow), False])
@torch.inference_mode()
def test_batched_mixed_tiles_equal_each_request_alone(model, thumbnail: bool) -> None:
    cfg = PruneConfig(ratio=0.5, vit_layer=5, vit_prune=0.3, vit_prune_thumbnail=thumbnail)
    engine = Engine(model, image_token_id=IMG, method=make_method(cfg, CFG), vit_batch=2)
    reqs = _requests((2, 1), max_new_tokens=2)
    batched = engine.generate(reqs)
    for r, b in zip(reqs, batched, strict=True):
        alone = engine.generate([r])[0]
        assert (alone.kept, alone.tokens, alone.pruning["vit_kept"]) == (b.kept, b.tokens, b.pruning["vit_kept"])
        assert set(b.kept) <= set(b.pruning["vit_kept"])
        assert b.visual_after == keep_count(256 * r.num_tiles, 0.5)


@torch.inference_mode()
def test_random_with_stage1_keeps_the_same_tokens_as_without(model) -> None:
    reqs = _requests((2, 1))
    plain = Engine(model, image_token_id=IMG, method=make_method(PruneConfig(method="random", ratio=0.6), CFG))
    staged = Engine(model, image_token_id=IMG,
                    method=make_method(PruneConfig(method="random", ratio=0.6, vit_prune=0.3, vit_layer=6), CFG))
    a = plain.select(reqs, plain.encode_images(reqs))
    b_visual = staged.encode_images(reqs)
    b = staged.select(reqs, b_visual)
    for x, y, avail in zip(a.keep, b.keep, b_visual.available, strict=True):
        assert torch.equal(x, y) and avail.numel() > y.numel()


# ------------------------------------------------------------------------------------------------ budgets


def test_fit_budgets_keeps_the_sum_under_the_caps() -> None:
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randint(1, 8)
        caps = [rng.randint(0, 256) for _ in range(n)]
        budgets = [rng.randint(0, 256) for _ in range(n)]
        if sum(budgets) > sum(caps):
            continue
        out = fit_budgets(budgets, caps, [rng.random() for _ in range(n)])
        assert sum(out) == sum(budgets) and all(o <= c for o, c in zip(out, caps, strict=True))
        assert all(o >= min(b, c) for o, b, c in zip(out, budgets, caps, strict=True))
    assert fit_budgets([10, 0], [4, 9], [0.0, 1.0]) == [4, 6]


@pytest.mark.parametrize("method", ["ptp", "random", "spatial"])
def test_two_stage_budgets_add_up_per_tile(method: str) -> None:
    rng = random.Random(2)
    for trial in range(60):
        tiles = rng.randint(1, 7)
        thumb = tiles > 1
        ratio = rng.choice([0.3, 0.5, 0.75, 0.9])
        vit = rng.choice([0.1, 0.25, ratio])
        cfg = PruneConfig(method=method, ratio=ratio, vit_prune=vit, vit_prune_thumbnail=rng.random() < 0.5,
                          region_budgets=rng.random() < 0.7, tau=rng.choice([0.05, 1.0]))
        m = make_method(cfg, CFG)
        gen = torch.Generator().manual_seed(trial)
        ctx = VisualContext(
            tiles=[tiles], has_thumbnail=[thumb], tokens_per_tile=256, cls=[torch.randn(tiles, 8, generator=gen)],
            token_scores=[torch.rand(tiles, 256, generator=gen)], instruction_scores=None, seeds=[trial],
        )
        first = stage1_budgets(ctx, 0, ratio=vit, tau=cfg.tau, use_regions=cfg.region_budgets,
                               thumbnail=cfg.vit_prune_thumbnail)
        if thumb and not cfg.vit_prune_thumbnail:
            assert first[-1] == 256 and sum(first[:-1]) == keep_count(256 * (tiles - 1), vit)
        else:
            assert sum(first) == keep_count(256 * tiles, vit)
        (available,) = m.vit_select(ctx)
        per_tile = survivors_per_tile(available, tiles, 256)
        if method != "random":  # random draws over the whole sample, not per tile
            assert per_tile == first
        assert available.unique().numel() == available.numel() == sum(per_tile)
        later = VisualContext(
            tiles=[tiles], has_thumbnail=[thumb], tokens_per_tile=256, cls=[torch.randn(tiles, 8, generator=gen)],
            token_scores=ctx.token_scores, instruction_scores=[torch.rand(tiles * 256, generator=gen)], seeds=[trial],
            available=[available],
        )
        (kept,) = m.select(later)
        assert kept is not None and kept.numel() == keep_count(256 * tiles, ratio)
        assert set(kept.tolist()) <= set(available.tolist())
        if method != "random":
            assert survivors_per_tile(kept, tiles, 256) == stage2_budgets(later, 0, m)


def test_settings_refuse_what_cannot_work() -> None:
    from ptp_cli.errors import UsageError

    with pytest.raises(UsageError, match="--vit-prune must be at most --ratio"):
        PruneConfig(ratio=0.5, vit_prune=0.6)
    with pytest.raises(UsageError, match="--vit-prune goes with --method"):
        PruneConfig(method="fastv", vit_prune=0.2)
    with pytest.raises(UsageError, match="--vit-layer must be in"):
        PruneConfig(method="random", vit_prune=0.2, vit_layer=99).check_layers(CFG)
    PruneConfig(method="random", vit_layer=99).check_layers(CFG)  # the layer only matters when stage 1 is on


# ------------------------------------------------------------------------------------------------ FLOPs


def test_flops_of_the_shorter_vit() -> None:
    v = CFG.vision
    assert F.vit_pruned_flops(v, layer=v.num_layers - 1, kept_per_tile=[3, 7]) == F.vit_flops(v, num_tiles=2)
    assert F.vit_pruned_flops(v, layer=2, kept_per_tile=[256, 256]) == F.vit_flops(v, num_tiles=2)
    # Hand count for one tile keeping 10 blocks after layer 2: 41 tokens in each later layer.
    c, i, h = v.hidden_size, v.intermediate_size, v.num_heads * v.head_dim
    layer_cost = {n: 2 * n * (4 * c * c + 2 * c * i) + 4 * h * n * n for n in (1025, 41)}
    embed = 2 * 1024 * 3 * 14 * 14 * c
    want = embed + 3 * layer_cost[1025] + (v.num_layers - 3) * layer_cost[41]
    assert F.vit_pruned_flops(v, layer=2, kept_per_tile=[10]) == want


@torch.inference_mode()
def test_reported_flops_count_what_ran(model) -> None:
    cfg = PruneConfig(ratio=0.5, vit_layer=5, vit_prune=0.25)
    (res,) = Engine(model, image_token_id=IMG, method=make_method(cfg, CFG)).generate(_requests((3,)))
    kept = res.pruning["vit_kept_per_tile"]
    plain = F.sample_flops(CFG, num_tiles=3, text_tokens=res.prompt_tokens - res.visual_after,
                           kept_visual=res.visual_after, generated=len(res.tokens), vit_score=True,
                           probe=(1, 5))
    staged = F.sample_flops(CFG, num_tiles=3, text_tokens=res.prompt_tokens - res.visual_after,
                            kept_visual=res.visual_after, generated=len(res.tokens), vit_score=True,
                            probe=(1, 5), vit_kept=(5, kept))
    assert res.flops == staged.as_dict()
    assert staged.vit < plain.vit and staged.probe < plain.probe and staged.prefill == plain.prefill


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow  # two subprocesses with the model: ~10 s
def test_cli_infer_and_show_with_vit_prune(tmp_path: Path, ptp_home: Path) -> None:
    Image.new("RGB", (900, 450), (30, 140, 60)).save(tmp_path / "wide.png")
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "image": "wide.png", "question": "What is it?"},
                                        {"id": "b", "image": "wide.png", "question": "Colour?", "max_tiles": 1}])
    done = ptp("infer", "in.jsonl", *FAST, "--vit-prune", "0.25", "--kept", "-o", "out.jsonl", home=ptp_home,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    rows = parse_rows((tmp_path / "out.jsonl").read_bytes())
    for row in rows:
        tiles = row["tokens"]["tiles"]
        assert len(row["vit_kept"]) == keep_count(256 * tiles, 0.25) == sum(row["pruning"]["vit_kept_per_tile"])
        assert set(row["kept"]) <= set(row["vit_kept"]) and len(row["kept"]) == keep_count(256 * tiles, 0.5)
        assert row["settings"]["vit_prune"] == 0.25
    shown = ptp("show", "out.jsonl", "--out-dir", "pics", home=ptp_home, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr.decode()
    assert len(list((tmp_path / "pics").glob("*.png"))) == 2


@pytest.mark.parametrize("args", [["--ratio", "0.5", "--vit-prune", "0.6"], ["--method", "fastv", "--vit-prune", "0.2"],
                                  ["--vit-prune", "1.5"]])
def test_cli_vit_prune_usage_errors(tmp_path: Path, args: list[str]) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "image": "x.png", "question": "q"}])
    done = ptp("infer", "in.jsonl", "--model", "tiny", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert "--vit-prune" in error_line(done.stderr)


def test_methods_lists_vit_prune() -> None:
    done = ptp("methods", "--json")
    data = json.loads(done.stdout)
    assert data["vit_prune"] == ["ptp", "random", "spatial"]
    assert data["presets"]["default"]["vit_prune"] == 0.0




# ------------------------------------------------------------------------------------------------ grids


def test_bench_and_eval_grids_add_vit_prune_rows() -> None:
    from ptp_cli.bench.config import BenchConfig
    from ptp_cli.bench.run import row_plan
    from ptp_cli.pruning import plan_grid

    bench = BenchConfig(model="tiny", methods=("ptp", "fastv", "random"), ratios=(0.5,), vit_prunes=(0.25, 0.75))
    plan = dict(row_plan(bench, CFG))
    assert list(plan) == ["none", "ptp@0.5", "ptp@0.5,vit=0.25", "fastv@0.5", "random@0.5", "random@0.5,vit=0.25"]
    assert plan["ptp@0.5,vit=0.25"].vit_prune == 0.25 and plan["ptp@0.5"].vit_prune == 0.0
    # ptp eval plans with the same loop (plan_grid), on top of the run's own settings
    specs = dict(plan_grid(PruneConfig(alpha=0.2), ("none", "ptp", "spatial"), (0.5, 0.75), CFG, vit_prunes=(0.5,)))
    assert [n for n in specs if ",vit=" in n] == ["ptp@0.5,vit=0.5", "ptp@0.75,vit=0.5", "spatial@0.5,vit=0.5",
                                                  "spatial@0.75,vit=0.5"]
    assert all(p.alpha == 0.2 and p.vit_prune == (0.5 if ",vit=" in n else 0.0) for n, p in specs.items())


def test_eval_vit_prunes_usage_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "gold.jsonl", [{"id": "a", "image": "x.png", "question": "q", "answer": "a"}])
    done = ptp("eval", "gold.jsonl", "--model", "tiny", "--out-dir", "o", "--vit-prunes", "0.5,2", cwd=tmp_path)
    assert done.returncode == 2 and "--vit-prunes" in error_line(done.stderr)
