"""ptp-mini: its checkpoint is a real InternVL2 checkpoint, training sees exactly the inference prompt and tiles,
training resumes to the same weights, and (once trained weights ship) its accuracy with and without pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptp_cli.io.records import iter_records
from ptp_cli.mini.model import build_mini_tokenizer
from ptp_cli.pruning import METHODS, PruneConfig
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.synth import TYPES, example, more_questions, write_benchmark
from ptp_cli.synth.scene import COLOURS, PLURALS, SHAPES
from ptp_cli.text.prompts import get_template
from ptp_cli.zoo import SHIPPED as SHIPPED_MODELS
from ptp_cli.zoo import load_model
from training.data import IGNORE, drop_visual, make_sample, token_truth
from training.evaluate import EVAL_SEED, evaluate, normalise, score
from training.pretrain import PretrainConfig, pretrain
from training.readouts import CarryHeads, head_outputs
from training.train import (
    STATE,
    TrainConfig,
    forward_loss,
    ground_targets,
    guide_losses,
    sample_for,
    sequence_inputs,
    train,
    view_objects,
)
from training.weights import export, new_model

SHIPPED_DIR = SHIPPED_MODELS["mini"]
CI_SEED = EVAL_SEED + 1  # the fixed CI split: never trained on (training refuses seeds >= EVAL_SEED)
SHIPPED = (SHIPPED_DIR / "config.json").is_file()
needs_weights = pytest.mark.skipif(not SHIPPED, reason="no trained ptp-mini weights shipped in this build yet")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory):
    """An untrained mini model and its export in the original InternVL2 layout."""
    d = tmp_path_factory.mktemp("mini")
    build_mini_tokenizer(d / "tok")
    model = new_model(d / "tok", seed=0)
    return model, export(model, d / "tok", d / "ckpt")


def test_the_export_is_an_original_internvl2_checkpoint_that_loads_unchanged(fresh):
    model, path = fresh
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["InternVLChatModel"]
    assert raw["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
    loaded = load_model(str(path))
    cfg = loaded.cfg
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.tokens_per_tile) == (448, 14, 256)
    assert cfg.use_thumbnail and cfg.max_dynamic_patch == 12 and cfg.template == "internlm2-chat"
    theirs = loaded.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name
    for method in METHODS:  # ptp's default layers exist at this depth, for every method
        PruneConfig(method=method).check_layers(cfg)


def test_training_sees_exactly_the_inference_prompt_and_tiles(fresh, tmp_path: Path):
    _, path = fresh
    write_benchmark(tmp_path, n=6, seed=CI_SEED, max_tiles=4)
    pipe = Pipeline(load_model(str(path)), RunConfig(model=str(path)))
    template = get_template(pipe.cfg.template)
    for i, record in enumerate(iter_records(tmp_path / "questions.jsonl")):
        request = pipe.prepare(record).request
        ex = example(CI_SEED, i, max_tiles=4)
        sample = make_sample(ex, [], tokenizer=pipe.tokenizer, template=template, cfg=pipe.cfg)
        n = len(request.ids)
        assert sample.ids[:n].tolist() == request.ids
        assert sample.image_start == request.image_start
        assert torch.equal(sample.pixel_values, request.pixel_values)
        # The answer follows the prompt, then the separator that stops generation; only they are targets.
        assert pipe.tokenizer.decode(sample.ids[n:-1].tolist()) == ex.question.answer
        assert sample.ids[-1].item() in request.stop_ids
        assert sample.labels[n - 1 : -1].tolist() == sample.ids[n:].tolist()
        assert set(sample.labels[: n - 1].tolist()) == {IGNORE}


def test_naming_rows_end_each_phrase_that_names_objects_and_point_at_them(fresh, tmp_path: Path):
    """The grounding loss's data: per question, the last token of each naming phrase, and the visual tokens of
    exactly the objects that phrase names (e.g. every circle for "What color is the circle?")."""
    model, path = fresh
    tokenizer = load_model(str(path)).tokenizer
    template = get_template(model.cfg.template)
    seen = set()
    for i in range(12):
        ex = example(5, i, max_tiles=4)
        sample = make_sample(ex, more_questions(ex.scene, np.random.default_rng(i), 3), tokenizer=tokenizer,
                             template=template, cfg=model.cfg)
        labels = sample.token_labels.flatten(0, 1)  # [T*256, 4]
        flat = [r for rows in sample.naming_rows for r in rows]
        assert len(flat) == len(sample.named)
        k = 0
        for qtype, rows in zip(sample.types, sample.naming_rows, strict=True):
            assert len(rows) == (2 if qtype == "position" else 1)
            for row in rows:
                word = tokenizer.decode(sample.ids[row - 3 : row + 1].tolist())
                after = tokenizer.decode(sample.ids[row + 1 : row + 2].tolist())
                assert word.rstrip().split()[-1] in {*SHAPES, *COLOURS, *PLURALS.values()}, word
                assert after[:1] in (" ", "?"), (word, after)  # the phrase ends at this token
                named = sample.named[k]
                if named:
                    shapes = {int(x) for x in labels[named, 1]}
                    colours = {int(x) for x in labels[named, 0]}
                    if qtype in ("color", "count"):
                        assert len(shapes) == 1, (qtype, word)
                    if qtype == "shape":
                        assert len(colours) == 1, (qtype, word)
                seen.add(qtype)
                k += 1
    assert seen == set(TYPES)


def _multi_tile_samples(model, tokenizer, n: int = 16):
    template = get_template(model.cfg.template)
    for i in range(n):
        ex = example(6, i, min_tiles=2, max_tiles=6)
        extra = more_questions(ex.scene, np.random.default_rng(i), 5)
        sample = make_sample(ex, extra, tokenizer=tokenizer, template=template, cfg=model.cfg)
        yield ex, [ex.question, *extra], sample


@pytest.mark.parametrize("count_view", ["thumbnail", "tiles"])
def test_place_and_count_targets_come_from_the_scene_and_each_phrase_grounds_on_its_view(fresh, count_view: str):
    """The carry read-outs' place and count targets agree with the generator's oracle (a position question's
    answer from the two places, a count question's answer); on multi-tile scenes position phrases ground on
    the thumbnail's tokens, text phrases on the tiles', count and existence phrases on a sink plus one centre
    token per named object in the ``count_view`` (the thumbnail or the tiles), colour and shape phrases on
    every view."""
    model, path = fresh
    tokenizer = load_model(str(path)).tokenizer
    cfg = TrainConfig(count_view=count_view)
    seen = set()
    for ex, questions, sample in _multi_tile_samples(model, tokenizer):
        n_tiles = sample.pixel_values.shape[0]
        thumb = (n_tiles - 1) * 256
        centres = set(sample.token_labels.flatten(0, 1)[:, 3].nonzero()[:, 0].tolist())
        asked = dict(ground_targets(sample, cfg))
        k = 0
        for q, qtype, rows in zip(questions, sample.types, sample.naming_rows, strict=True):
            places = sample.named_place[k:k + len(rows)]
            counts = sample.named_count[k:k + len(rows)]
            if qtype == "position":
                (ax, ay), (bx, by) = places
                dx, dy = (ax - bx) * ex.scene.width, (ay - by) * ex.scene.height
                want = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
                assert want == q.answer
                seen.add("position")
            if qtype == "count":
                assert counts == [int(q.answer)]
                seen.add("count")
            for r, named in zip(rows, sample.named[k:k + len(rows)], strict=True):
                got = [p - sample.image_start for p in asked.get(r, [])]
                if qtype in ("count", "exist"):  # a sink first, then the named objects' centres in one view
                    assert asked[r][0] == 0
                    in_view = [i for i in named if (i >= thumb) == (count_view == "thumbnail") and i in centres]
                    assert got[1:] == in_view
                    assert len(got) - 1 == counts[0] or qtype == "exist"
                elif not named:
                    assert r not in asked
                elif qtype == "position":
                    assert got == [i for i in named if i >= thumb] and got
                elif qtype == "text":
                    assert got == [i for i in named if i < thumb] and got
                else:
                    assert got == named and min(named) < thumb
            k += len(rows)
    assert seen == {"position", "count"}


def test_every_guide_gives_a_finite_loss_with_gradients(fresh):
    """Grounding (layer ``ground_layer``), carry (its output), routing (heads 0 and 1 of ``route_layer``) and
    token place (the thumbnail's object tokens at the grounding layer's input) each produce a loss on a
    multi-tile sample that asks every question type, and each reaches the LLM."""
    model, path = fresh
    tokenizer = load_model(str(path)).tokenizer
    cfg = TrainConfig(token_place_weight=1.0, route_place_weight=1.0, route_count_weight=1.0)
    lm = model.language_model
    carry = CarryHeads(model.cfg.llm.hidden_size, token_place=True, route_place=True, route_count=True)
    sample = next(s for _, _, s in _multi_tile_samples(model, tokenizer, 40) if {"position", "count"} <= set(s.types))
    h, positions, cos, sin, valid = sequence_inputs(model, sample)
    losses = {}
    for i, block in enumerate(lm.layers):
        losses.update(guide_losses(lm, carry, h, positions, sample, cfg, i))
        h = block(h, cos, sin, None, valid, causal=True).hidden
    assert set(losses) == {"ground", "carry", "route", "token_place", "route_place", "route_count"}
    for name, value in losses.items():
        assert torch.isfinite(value) and value > 0, name
        model.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        layer = 0 if name == "token_place" else cfg.ground_layer  # token place: what layers 0 and 1 bring over
        grads = [p.grad for p in lm.layers[layer].attention.parameters() if p.grad is not None]
        assert grads or name in ("route", "route_place", "route_count"), name
    assert carry.place.weight.grad is not None and carry.count.weight.grad is not None
    index = view_objects(sample)  # the thumbnail's object tokens
    assert len(index) and (sample.token_labels[-1, index, 0] > 0).all()
    assert int((sample.token_labels[-1, :, 0] > 0).sum()) == len(index)


def test_a_sample_with_dropped_visual_tokens_is_the_pruned_prompt_with_the_same_targets(fresh):
    """``drop_visual`` leaves exactly the kept visual features in the sequence, at contiguous positions, with
    the text unchanged after them; every guide still points at the same tokens (those left); and training's
    background dropout is deterministic, drops only background tokens and changes nothing when off."""
    model, path = fresh
    tokenizer = load_model(str(path)).tokenizer
    cfg = TrainConfig(token_place_weight=1.0)
    sample = next(s for _, _, s in _multi_tile_samples(model, tokenizer, 40) if {"position", "count"} <= set(s.types))
    n = sample.pixel_values.shape[0] * 256
    kept = torch.from_numpy(np.random.default_rng(0).random(n) < 0.4).nonzero()[:, 0]
    pruned = drop_visual(sample, kept)
    h, *_ = sequence_inputs(model, sample)
    hp, positions_p, *_ = sequence_inputs(model, pruned)
    start, d = sample.image_start, n - len(kept)
    assert hp.shape[1] == h.shape[1] - d and torch.equal(positions_p[0], torch.arange(hp.shape[1]))
    assert torch.equal(hp[0, start:start + len(kept)], h[0, start + kept])  # the kept features, in order
    assert torch.equal(hp[0, start + len(kept):], h[0, start + n:]) and torch.equal(pruned.ids[start + len(kept):],
                                                                                   sample.ids[start + n:])
    for a, b in zip(sample.answer_rows, pruned.answer_rows, strict=True):
        assert sample.ids[a] == pruned.ids[b] and sample.labels[a] == pruned.labels[b]
    full = dict(ground_targets(sample, cfg))
    rank = {int(k): i for i, k in enumerate(kept)}
    expected = {}
    for row, targets in full.items():
        wanted = [p for p in targets if p < start or int(p - start) in rank]  # the sink, and the kept tokens
        if wanted:  # a row whose every target was dropped asks for nothing
            expected[row - d] = [p if p < start else start + rank[p - start] for p in wanted]
    assert dict(ground_targets(pruned, cfg)) == expected and len(expected) > len(full) // 2
    # background dropout in training
    template = get_template(model.cfg.template)
    off = TrainConfig(seed=3)
    on = TrainConfig(seed=3, drop_background=1.0, drop_max=0.9)
    a, b, c = (sample_for(x, 5, 1, tokenizer, template, model.cfg) for x in (off, on, on))
    assert a.kept is None and torch.equal(b.kept, c.kept) and 0 < len(b.kept) < a.ids.numel()
    objects = (a.token_labels[..., 0] > 0).flatten().nonzero()[:, 0]
    assert torch.isin(objects, b.kept).all()  # only background is dropped
    assert torch.equal(torch.tensor(b.visual_rows(objects)), b.image_start + torch.searchsorted(b.kept, objects))
    carry = CarryHeads.for_run(model.cfg.llm.hidden_size, cfg)
    loss, stats = forward_loss(model, carry, b, cfg)
    assert torch.isfinite(loss) and "token_place" in stats and "ground" in stats


def _routing_layer(model, tokenizer, kind: str, cfg: TrainConfig, loss: str) -> tuple[dict, torch.Tensor]:
    """The guide losses at the routing layer for a sample asking a ``kind`` question, and which heads the
    ``loss`` reaches: [H] gradient mass on each head's slice of that layer's output projection."""
    lm = model.language_model
    sample = next(s for _, _, s in _multi_tile_samples(model, tokenizer, 40) if kind in s.types)
    att = lm.layers[cfg.route_layer].attention
    h, positions, cos, sin, valid = sequence_inputs(model, sample)
    for block in lm.layers[:cfg.route_layer]:
        h = block(h, cos, sin, None, valid, causal=True).hidden
    losses = guide_losses(lm, CarryHeads.for_run(model.cfg.llm.hidden_size, cfg), h, positions, sample, cfg,
                          cfg.route_layer)
    model.zero_grad(set_to_none=True)
    losses[loss].backward()
    return losses, att.wo.weight.grad.abs().unflatten(1, (att.num_heads, att.head_dim)).sum((0, 2))  # [H]


@pytest.mark.parametrize(("option", "kind", "width", "bad"), [
    ("route_count_head", "count", 1, 4),  # the count from one head
    ("route_place_head", "position", 2, 3),  # the two places from that head and the next
])
def test_routing_read_outs_read_their_own_heads(fresh, option: str, kind: str, width: int, bad: int):
    """--route-count-head 2 / --route-place-head 2: the read-out's gradient reaches only the chosen heads'
    slices of the output projection (head 0 and up by default), and the routing loss also sends those heads
    to the naming tokens; a head the layer does not have is refused."""
    model, path = fresh
    tokenizer = load_model(str(path)).tokenizer
    loss = option.removesuffix("_head")
    routes = {}
    for first in (0, 2):
        cfg = TrainConfig(**{f"{loss}_weight": 1.0, option: first})
        losses, g = _routing_layer(model, tokenizer, kind, cfg, loss)
        heads = list(range(first, first + width))
        assert (g[heads] > 0).all() and all(g[i] == 0 for i in range(len(g)) if i not in heads), (first, g)
        routes[first] = losses["route"]
    assert routes[2] > routes[0]  # more heads to route
    with pytest.raises(ValueError, match=option.replace("_", "-")):
        train(path, TrainConfig(**{option: bad}, init="x"))


def test_head_outputs_add_up_to_the_attention_output(fresh):
    """The route-place loss reads what single heads add at a row: over every head, those add up to the
    attention module's own output there (independently computed by the inference code)."""
    model, path = fresh
    tokenizer = load_model(str(path)).tokenizer
    sample = next(s for _, _, s in _multi_tile_samples(model, tokenizer, 10))
    lm = model.language_model
    h, positions, cos, sin, valid = sequence_inputs(model, sample)
    with torch.no_grad():
        for layer in (0, 3):
            x = h
            for block in lm.layers[:layer]:
                x = block(x, cos, sin, None, valid, causal=True).hidden
            block = lm.layers[layer]
            want, _, _ = block.attention(block.attention_norm(x), cos, sin, None, valid, causal=True)  # [1, S, D]
            rows = sample.answer_rows
            got = head_outputs(lm, x, positions, rows, layer, list(range(block.attention.num_heads)))  # [H, R, D]
            torch.testing.assert_close(got.sum(0), want[0, rows], atol=1e-5, rtol=1e-4)


def test_token_truth_marks_each_object_once_per_grid_and_once_in_the_thumbnail():
    for i in range(24):
        scene = example(5, i).scene
        n_tiles = scene.grid[0] * scene.grid[1]
        n_tiles += n_tiles > 1
        labels, present, where = token_truth(scene, n_tiles)  # [T, 256, 4], [T, K], per object
        grid_tiles = labels[:-1] if n_tiles > 1 else labels
        assert int(grid_tiles[..., 3].sum()) == len(scene.objects)
        if n_tiles > 1:
            assert int(labels[-1, :, 3].sum()) <= len(scene.objects)  # centres may share a thumbnail token
            assert present[-1, -1] == 1
        for o in scene.objects:
            colour, shape = list(COLOURS).index(o.colour) + 1, list(SHAPES).index(o.shape) + 1
            hits = (labels[..., 0] == colour) & (labels[..., 1] == shape)
            assert hits.any(), (i, o)
        for n, tokens in enumerate(where):  # each object's tokens are labelled with it
            o = scene.objects[n]
            assert tokens and (labels.flatten(0, 1)[tokens, 1] == list(SHAPES).index(o.shape) + 1).any()


def test_scoring_is_normalised_exact_match():
    gold = {"a": {"answer": "red", "type": "color"}, "b": {"answer": "3", "type": "count"},
            "c": {"answer": "yes", "type": "exist"}}
    rows = [{"id": "a", "answer": " Red."}, {"id": "b", "answer": "three"}, {"id": "c", "error": {}}]
    assert normalise(" Red. ") == "red"
    assert score(rows, gold) == {"accuracy": round(1 / 3, 4), "n": 3,
                                 "per_type": {"color": 1.0, "count": 0.0, "exist": 0.0}}


def test_training_refuses_held_out_seeds(tmp_path: Path):
    with pytest.raises(ValueError, match="held out"):
        train(tmp_path, TrainConfig(seed=EVAL_SEED))


def test_the_vqa_stage_needs_a_pretrained_vision_side(tmp_path: Path):
    with pytest.raises(ValueError, match="--init"):
        train(tmp_path, TrainConfig())


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path):
    vision = pretrain(tmp_path / "vit", PretrainConfig(steps=1, scenes_per_step=1, warmup=1, probe_every=0))
    cfg = TrainConfig(steps=2, images_per_step=1, extra_questions=1, warmup=1, single_tile_until=1.0,
                      checkpoint_minutes=60, eval_minutes=0, init=str(vision))
    train(tmp_path / "straight", cfg)
    train(tmp_path / "twice", cfg, stop_at=1)
    assert torch.load(tmp_path / "twice" / STATE, weights_only=True)["step"] == 1
    train(tmp_path / "twice", cfg)
    a = torch.load(tmp_path / "straight" / STATE, weights_only=True)
    b = torch.load(tmp_path / "twice" / STATE, weights_only=True)
    assert a["step"] == b["step"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    vit = torch.load(vision, weights_only=True)
    for name, tensor in a["model"].items():  # the vision side stays as pretrained
        if name.startswith(("vision_model.", "mlp1.")):
            assert torch.equal(tensor, vit[name]), name


# ---------------------------------------------------------------------------------------------------------
# The shipped weights


@pytest.mark.skipif(SHIPPED, reason="trained weights are shipped")
def test_model_mini_without_shipped_weights_is_one_clear_error(tmp_path: Path):
    write_benchmark(tmp_path, n=1, seed=CI_SEED, max_tiles=1)
    done = subprocess.run(
        [sys.executable, "-m", "ptp_cli.cli.main", "infer", str(tmp_path / "questions.jsonl"), "--model", "mini"],
        capture_output=True, timeout=300, check=False,
    )
    err = done.stderr.decode().strip()
    assert done.returncode == 1 and err.startswith("ptp: error:") and "training/README.md" in err, err
    assert "\n" not in err


@needs_weights
def test_the_shipped_checkpoint_loads_through_the_public_path():
    loaded = load_model("mini")
    assert loaded.path == SHIPPED_DIR and loaded.cfg.name == "mini"


@needs_weights
def test_ptp_infer_model_mini_answers_a_synth_question(tmp_path: Path):
    write_benchmark(tmp_path, n=6, seed=CI_SEED, max_tiles=2)
    done = subprocess.run(
        [sys.executable, "-m", "ptp_cli.cli.main", "infer", str(tmp_path / "questions.jsonl"), "--model", "mini",
         "--max-new-tokens", "4", "-q"], capture_output=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(rows) == 6 and all(r["answer"] for r in rows)


@needs_weights
def test_the_readme_quick_start_answers_the_bundled_synth_samples(tmp_path: Path):
    """`ptp infer samples/synth/questions.jsonl --model mini` (the README's first command) answers every
    sample as the benchmark's own generator says (the samples are examples of seed 1003)."""
    samples = Path(__file__).resolve().parent.parent / "samples" / "synth" / "questions.jsonl"
    done = subprocess.run([sys.executable, "-m", "ptp_cli.cli.main", "infer", str(samples), "--model", "mini", "-q"],
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(rows) == 6
    for row in rows:
        seed, index = (int(x) for x in row["id"].split("-"))
        ex = example(seed, index)
        assert (row["type"], row["answer"]) == (ex.question.type, ex.question.answer), row["id"]


@pytest.fixture(scope="module")
def ci_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ci_split")


@pytest.mark.slow  # in CI's own step (.ci/run): keeps the default run under 10 minutes on 2 cores
@needs_weights
def test_shipped_mini_accuracy_unpruned_and_with_ptp(ci_split: Path):
    """A regression guard on a fixed 42-question split (seed 1001, up to 6 tiles), through the public pipeline.

    The issue's targets for this split are unpruned >= 85% (met: 85.7%, 36 of 42) and PTP@0.5 within 5 points
    (NOT met: 71.4%, -14.3; position 4 of 7 unpruned, 0 of 7 with PTP@0.5; docs/accuracy.md says what PTP
    drops that position answers use). The bounds below sit under those measurements, far
    above chance (23.9%): they catch a broken model, loader or pruning path, not a few questions' noise."""
    full = evaluate("mini", ci_split, n=42, seed=CI_SEED, max_tiles=6)
    ptp = evaluate("mini", ci_split, n=42, seed=CI_SEED, max_tiles=6, method="ptp", ratio=0.5)
    assert full["accuracy"] >= 0.80, full
    assert all(full["per_type"][t] >= 0.85 for t in ("color", "shape", "exist", "text")), full
    assert ptp["accuracy"] >= 0.65 and ptp["accuracy"] >= full["accuracy"] - 0.17, (full, ptp)
