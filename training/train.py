"""Stage 2 of ptp-mini: train the LLM on synth scenes over the frozen vision side, on the CPU, deterministically
and resumably. The shipped weights' run (``training.recipe`` holds every stage's command):

    python -m training.train --out runs/mini --seed 1 --steps 5000 --single-tile-until 0.25 \
        --small-grid-until 0.6 --init runs/vit-1b/vision.pt --count-view tiles \
        --token-place-weight 1 --route-place-weight 1 --route-count-weight 1 --route-count-head 2

trains ptp's own ``InternVLModel`` (the modules inference runs, with gradients) on ``ptp_cli.synth`` examples
drawn with the training seed (never an evaluation seed). The ViT and projector come from stage 1
(``training.pretrain``, ``--init``) and stay frozen. Killed and started again with the same arguments, it
continues from its last checkpoint (weights, optimizer, step) and reaches the same weights as an uninterrupted
run: every example is a pure function of (seed, index) and nothing else draws random numbers.

Losses: next-token cross-entropy on the answers (and the separator that ends each), plus guides that make an
LLM this small learn to look within an hour (without them it learns each question type's answer prior and
nothing else). On by default: *grounding*, the tokens that end a phrase naming objects attend (layer
``ground_layer``, after the question's words have mixed) to those objects' visual tokens, in the view the
question needs (``ground_targets``), as referring/grounding data teaches real VLMs; *carry*, after that layer
those tokens' hidden states hold the named object's colour, shape, glyph and place and how many objects the
phrase names (training-only read-outs, not exported); *routing*, heads 0 and 1 of the answer position attend
to the (first and second) naming tokens at layer ``route_layer``. Off by default and on in the shipped recipe
(above): *token place* (``--token-place-weight``), the thumbnail's object tokens hold their place at the
grounding layer's input (the ViT keeps places in the background's tokens only); *route place* and *route
count* (``--route-place-weight``, ``--route-count-weight``, ``--route-count-head``), what the routing heads
bring to the answer holds each object's place and the count. Off, and not in the shipped recipe: *background
dropout* (``--drop-background``), some scenes' sequences lose part of their background tokens with the
positions renumbered, as pre-LLM pruning leaves a prompt. No loss shapes PTP's instruction score (the question
tokens' attention at LLM layer 1).

Curriculum: single-tile scenes first, then grids of up to 4 tiles, then up to 12 (training/README.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptp_cli.mini.model import MINI, build_mini_tokenizer
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.synth import example, more_questions
from ptp_cli.text.prompts import get_template
from ptp_cli.text.tokenization import load_tokenizer
from training.data import IGNORE, TOKEN_GRID, Sample, drop_visual, make_sample
from training.evaluate import EVAL_SEED, evaluate
from training.pretrain import load_vision
from training.readouts import CarryHeads, attention_loss, head_outputs
from training.runs import config_main, load_state, log, lr_at, save_state
from training.weights import export, new_model

STATE = "train_state.pt"
ROUTED_FIRST = 0  # the head the routing loss sends to the (first) naming token (head 1: to the second one)
SCHEDULE_ONLY = ("checkpoint_minutes", "eval_minutes", "eval_questions")  # settings that do not change the weights


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1  # training data and init seed; below EVAL_SEED (seeds from there on are held out)
    steps: int = 4000  # optimizer steps
    images_per_step: int = 2  # gradient accumulation: scenes per optimizer step
    extra_questions: int = 11  # further questions about each scene (later turns of the same chat)
    lr: float = 1e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decay of matrices
    ground_weight: float = 1.0  # weight of the grounding loss: naming tokens attend to the objects they name
    ground_layer: int = 2  # the LLM layer whose attention that loss shapes (after the text has mixed)
    thumb_ground: bool = True  # position and count phrases ground on the thumbnail's tokens only (one view of
    # the whole canvas: global places, each object once) when the scene has more than one tile
    place_bins: int = 16  # the carry read-out of an object's place: this many bins across the canvas, per axis
    place_head: int = -1  # >= 0: position phrases ground with that head of the layer alone (-1: mean of all heads)
    sink_ground: bool = True  # count and existence phrases ground on the named objects' centres or a sink
    count_view: str = "thumbnail"  # where those centres are on multi-tile scenes: "thumbnail" or "tiles" (an
    # object lies wholly inside one tile, so the tiles too show each object once, with legible shapes)
    text_tiles: bool = True  # text phrases ground on the tiles' tokens only (not the thumbnail's)
    carry_weight: float = 1.0  # weight of the carry loss: after that layer, a naming token holds its object
    token_place_weight: float = 0.0  # weight of the token-place loss: at the grounding layer's input, the object
    # tokens of the whole-canvas view (thumbnail, or the one tile) hold their row and column there (the ViT
    # keeps places in the background's tokens, not in the objects'; layers 0 and 1 can bring them over)
    route_weight: float = 1.0  # weight of the routing loss: the answer position attends to the naming tokens
    route_layer: int = 3  # the LLM layer (heads 0 and 1 of it) whose attention that loss shapes
    route_place_weight: float = 0.0  # weight of the route-place loss: on position questions, what heads 0 and 1
    # of that layer bring to the answer position holds the first and the second object's place (apart, so
    # the last MLP can compare them)
    route_place_head: int = 0  # the first of the two heads read for the places (it and the next one); 0 (heads 0
    # and 1, which the routing loss already sends to the first and the second naming token) adds no attention
    # term; another head is also sent there, on position questions, by an attention term of its own
    route_count_weight: float = 0.0  # weight of the route-count loss: on count and existence questions, what the
    # count head (below) of that layer brings to the answer position holds how many objects the question names
    route_count_head: int = 0  # the head of that layer read for the count; 0 (head 0, which the routing loss
    # already sends to the naming token) adds no attention term; another head is also sent to the naming token,
    # on count and existence questions, by an attention term of its own (heads 2 and 3 share the other
    # key-value head than heads 0 and 1, so the count does not crowd the values that carry colour, shape,
    # glyph and place)
    drop_background: float = 0.0  # probability that a scene's sequence loses part of its background tokens
    # before the LLM (contiguous positions after, as pre-LLM pruning leaves a prompt): the place of an object
    # must then come from what survives, not from its distance to the image's first token
    drop_max: float = 0.9  # the share of background tokens dropped is uniform in [0, drop_max]
    single_tile_until: float = 0.15  # fraction of training on one-tile scenes only
    small_grid_until: float = 0.45  # then scenes of up to 4 tiles until this fraction, then up to 12
    checkpoint_minutes: float = 5.0  # wall-clock minutes between checkpoints
    eval_minutes: float = 20.0  # wall-clock minutes between held-out evaluations (0: never)
    eval_questions: int = 60  # held-out questions per evaluation
    vit_width: int = 32  # ViT width (12 layers, heads of 16 channels); must match --init's
    init: str = ""  # vision.pt of stage 1 (training.pretrain): ViT and projector, kept frozen; a whole
    # model state (a fine-tune) also brings its LLM


def tile_cap(cfg: TrainConfig, step: int, rng: np.random.Generator) -> int:
    """Most tiles a scene may have at ``step`` (the curriculum)."""
    p = step / cfg.steps
    if p < cfg.single_tile_until:
        return 1
    caps, weights = ((1, 4), (0.5, 0.5)) if p < cfg.small_grid_until else ((1, 4, 12), (0.3, 0.4, 0.3))
    return int(rng.choice(caps, p=weights))


def sample_for(cfg: TrainConfig, step: int, k: int, tokenizer, template, model_cfg) -> Sample:
    """The k-th scene of ``step``: a pure function of (seed, step, k)."""
    index = step * cfg.images_per_step + k
    rng = np.random.default_rng([cfg.seed, index, 7])
    ex = example(cfg.seed, index, max_tiles=tile_cap(cfg, step, rng))
    extra = more_questions(ex.scene, rng, cfg.extra_questions)
    sample = make_sample(ex, extra, tokenizer=tokenizer, template=template, cfg=model_cfg)
    if cfg.drop_background:  # its own generator, so runs without it draw every scene as before
        drops = np.random.default_rng([cfg.seed, index, 13])
        if drops.random() < cfg.drop_background:
            background = (sample.token_labels[..., 0] == 0).flatten().numpy()  # [T*256]
            lost = background & (drops.random(background.size) < drops.uniform(0.0, cfg.drop_max))
            sample = drop_visual(sample, torch.from_numpy(~lost).nonzero()[:, 0])
    return sample


def row_types(sample: Sample) -> list[str]:
    """The question type of each naming row, flat and in order (as ``Sample.named``)."""
    return [t for t, rs in zip(sample.types, sample.naming_rows, strict=True) for _ in rs]


def ground_targets(sample: Sample, cfg: TrainConfig) -> list[tuple[int, list[int]]]:
    """(naming row, sequence positions it should attend to) for the grounding loss: the named objects' visual
    tokens; on a multi-tile scene only the thumbnail's for position and count phrases (``thumb_ground``: global
    places, each object once) and only the tiles' for text phrases (``text_tiles``: glyphs are legible there).
    With ``sink_ground``, count and existence phrases aim at the named objects' centre tokens (in the
    ``count_view``: the thumbnail, or the tiles) or the first token of the sequence, the model's choice: the
    share left on that sink can say how many objects there are (none, for "no" questions). Other rows naming
    nothing are left out."""
    n_tiles = sample.pixel_values.shape[0]
    thumb = (n_tiles - 1) * TOKEN_GRID**2 if n_tiles > 1 else 0  # first thumbnail token
    centres = set(sample.token_labels.flatten(0, 1)[:, 3].nonzero()[:, 0].tolist())
    kinds = row_types(sample)
    rows = [r for rs in sample.naming_rows for r in rs]
    asked = []
    for r, t, kind in zip(rows, sample.named, kinds, strict=True):
        if cfg.sink_ground and kind in ("count", "exist"):
            view = (lambda i: i >= thumb) if cfg.count_view == "thumbnail" else (lambda i: i < thumb or not thumb)
            t = [i for i in t if view(i) and i in centres]
        elif cfg.thumb_ground and kind in ("position", "count"):
            t = [i for i in t if i >= thumb]
        elif cfg.text_tiles and kind == "text" and thumb:
            t = [i for i in t if i < thumb]
        positions = sample.visual_rows(t)  # those left in the sequence
        if cfg.sink_ground and kind in ("count", "exist"):
            positions = [0, *positions]
        if positions:  # "no" questions name nothing
            asked.append((r, positions))
    return asked


def view_objects(sample: Sample) -> torch.Tensor:
    """Indices (row * 16 + column) of the object tokens in the view of the whole canvas: the thumbnail, or the
    one tile of a single-tile scene (the last view either way)."""
    return (sample.token_labels[-1, :, 0] > 0).nonzero()[:, 0]


def guide_losses(lm, carry: CarryHeads, h: torch.Tensor, positions: torch.Tensor, sample: Sample, cfg: TrainConfig,
                 layer: int) -> dict[str, torch.Tensor]:
    """The losses that guide the LLM's attention and hidden states at ``layer`` (h [1, S, D] its input)."""
    out: dict[str, torch.Tensor] = {}
    rows = [r for rs in sample.naming_rows for r in rs]
    kinds = row_types(sample)
    if layer == cfg.ground_layer and cfg.ground_weight:
        asked = ground_targets(sample, cfg)
        place_rows = {r for r, k in zip(rows, kinds, strict=True) if k == "position"} if cfg.place_head >= 0 else set()
        terms = []
        for head, group in ((None, [a for a in asked if a[0] not in place_rows]),
                            (cfg.place_head, [a for a in asked if a[0] in place_rows])):
            if group:  # one head finds a position phrase's object in the thumbnail, the mean of all heads the rest
                terms.append(len(group) * attention_loss(lm, h, positions, [r for r, _ in group],
                                                         [torch.tensor(t) for _, t in group], layer=layer, head=head))
        if terms:
            out["ground"] = torch.stack(terms).sum() / len(asked)
    if layer == cfg.ground_layer and cfg.token_place_weight:
        index = view_objects(sample)
        base = (sample.pixel_values.shape[0] - 1) * TOKEN_GRID**2  # the view's first visual token
        if sample.kept is not None:  # background dropout keeps every object token; this holds if it did not
            index = index[torch.isin(base + index, sample.kept)]
        if len(index):
            out["token_place"] = carry.token_place_loss(h[0, sample.visual_rows(base + index)], index)
    if layer == cfg.ground_layer + 1 and cfg.carry_weight:
        terms = []
        one = [(r, c) for r, c in zip(rows, sample.named_one, strict=True) if c is not None]
        if one:
            terms.append(carry.loss(h[0, [r for r, _ in one]], torch.tensor([c for _, c in one])))
        placed = [(r, p) for r, p, k in zip(rows, sample.named_place, kinds, strict=True)
                  if p is not None and k == "position"]
        if placed:
            terms.append(carry.place_loss(h[0, [r for r, _ in placed]], torch.tensor([p for _, p in placed])))
        counted = [(r, n) for r, n, k in zip(rows, sample.named_count, kinds, strict=True) if k in ("count", "exist")]
        if counted:
            terms.append(carry.count_loss(h[0, [r for r, _ in counted]], torch.tensor([n for _, n in counted])))
        if terms:
            out["carry"] = torch.stack(terms).sum()
    if layer == cfg.route_layer and cfg.route_weight:
        # head 0: the answer position reads the (first) naming token; head 1: the second one, where a question
        # names two objects (position: compare their places)
        first = [torch.tensor(rs[:1]) for rs in sample.naming_rows]
        route = attention_loss(lm, h, positions, sample.answer_rows, first, layer=layer, head=ROUTED_FIRST)
        pairs = [(a, rs[1]) for a, rs in zip(sample.answer_rows, sample.naming_rows, strict=True) if len(rs) > 1]
        if pairs:
            route = route + attention_loss(lm, h, positions, [a for a, _ in pairs],
                                           [torch.tensor([b]) for _, b in pairs], layer=layer, head=ROUTED_FIRST + 1)
        first = np.cumsum([0] + [len(rs) for rs in sample.naming_rows])  # each question's first naming row
        placed = [(a, rs) for a, t, rs in zip(sample.answer_rows, sample.types, sample.naming_rows, strict=True)
                  if t == "position" and len(rs) > 1]
        if cfg.route_place_weight and cfg.route_place_head != ROUTED_FIRST and placed:
            for i in range(2):  # the place heads read the first and the second named object
                route = route + attention_loss(lm, h, positions, [a for a, _ in placed],
                                               [torch.tensor([rs[i]]) for _, rs in placed],
                                               layer=layer, head=cfg.route_place_head + i)
        head = cfg.route_count_head
        counted = [(a, f) for a, t, f in zip(sample.answer_rows, sample.types, first, strict=False)
                   if t in ("count", "exist")]  # (answer row, first naming row)
        if cfg.route_count_weight and head != ROUTED_FIRST and counted:
            route = route + attention_loss(lm, h, positions, [a for a, _ in counted],
                                           [torch.tensor([rows[f]]) for _, f in counted], layer=layer, head=head)
        out["route"] = route
        if cfg.route_place_weight:
            asked = [(a, sample.named_place[f], sample.named_place[f + 1])
                     for a, t, f in zip(sample.answer_rows, sample.types, first, strict=False)
                     if t == "position" and sample.named_place[f] is not None and sample.named_place[f + 1] is not None]
            pair = [cfg.route_place_head, cfg.route_place_head + 1]
            if asked:
                outs = head_outputs(lm, h, positions, [a for a, _, _ in asked], layer, pair)  # [2, R, D]
                out["route_place"] = sum(
                    carry.route_place_loss(i, outs[i], torch.tensor([p[1 + i] for p in asked])) for i in range(2))
        if cfg.route_count_weight and counted:
            outs = head_outputs(lm, h, positions, [a for a, _ in counted], layer, [head])[0]  # [R, D]
            out["route_count"] = carry.route_count_loss(outs, torch.tensor([sample.named_count[f] for _, f in counted]))
    return out


def sequence_inputs(model: InternVLModel, sample: Sample) -> tuple[torch.Tensor, ...]:
    """(h [1, S, D], positions [1, S], cos, sin, valid [1, S]) the LLM's first layer takes for ``sample``: its
    token embeddings with the (frozen, gradient-free) visual features in the image's place."""
    lm = model.language_model
    with torch.no_grad():
        visual = model.vision_features(sample.pixel_values).features.flatten(0, 1)  # [T*256, D], tiles in order
    if sample.kept is not None:
        visual = visual[sample.kept]  # [K, D]
    emb = lm.tok_embeddings(sample.ids)  # [S, D]
    start = sample.image_start
    h = torch.cat([emb[:start], visual, emb[start + visual.shape[0]:]])[None]  # [1, S, D]
    s = h.shape[1]
    positions = torch.arange(s)[None]
    cos, sin = lm.rotary(positions, h.dtype, lengths=torch.tensor([s]))
    return h, positions, cos, sin, torch.ones(1, s, dtype=torch.bool)


def forward_loss(
    model: InternVLModel, carry: CarryHeads, sample: Sample, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer loss (+ the guiding losses) of one sample, through the inference modules; the vision side is
    frozen."""
    lm = model.language_model
    h, positions, cos, sin, valid = sequence_inputs(model, sample)
    guides: dict[str, torch.Tensor] = {}
    for i, block in enumerate(lm.layers):
        guides.update(guide_losses(lm, carry, h, positions, sample, cfg, i))
        h = block(h, cos, sin, None, valid, causal=True).hidden
    targets = sample.labels
    scored = targets != IGNORE
    logits = lm.logits(h[0, scored])  # [A, V]
    loss = F.cross_entropy(logits, targets[scored])
    answers = torch.searchsorted(scored.nonzero()[:, 0], torch.tensor(sample.answer_rows))  # rows among scored
    right = (logits[answers].argmax(-1) == targets[scored][answers]).float()
    stats = {"lm": loss.item(), "answer_acc": right.mean().item()}
    weights = {"ground": cfg.ground_weight, "carry": cfg.carry_weight, "route": cfg.route_weight,
               "token_place": cfg.token_place_weight, "route_place": cfg.route_place_weight,
               "route_count": cfg.route_count_weight}
    for name, value in guides.items():
        loss = loss + weights[name] * value
        stats[name] = value.item()
    return loss, stats


def _optimizer(model: nn.Module, carry: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in [*model.parameters(), *carry.parameters()] if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def train(out: Path, cfg: TrainConfig, *, stop_at: int | None = None) -> Path:
    """Train (or resume) into ``out``; returns the exported checkpoint directory ``out/export``.

    ``stop_at``: save and return after that step (a planned interruption; the run resumes from there)."""
    if not 0 <= cfg.seed < EVAL_SEED:
        raise ValueError(f"seeds {EVAL_SEED} and up are held out for evaluation; train with a seed in [0, {EVAL_SEED})")
    if cfg.count_view not in ("thumbnail", "tiles"):
        raise ValueError(f"--count-view is 'thumbnail' or 'tiles', not {cfg.count_view!r}")
    if not 0 <= cfg.route_place_head < MINI.llm.num_heads - 1:
        raise ValueError(f"--route-place-head is the first of two heads of the routing layer, 0 to "
                         f"{MINI.llm.num_heads - 2}")
    if not 0 <= cfg.route_count_head < MINI.llm.num_heads:
        raise ValueError(f"--route-count-head is a head of the routing layer, 0 to {MINI.llm.num_heads - 1}")
    if not cfg.init:
        raise ValueError("the VQA stage starts from a pretrained vision side: pass --init runs/vit-1b/vision.pt "
                         "(python -m training.pretrain)")
    torch.set_num_threads(1)
    out = Path(out)
    tok_dir = out / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    if not (tok_dir / "tokenizer.json").is_file():
        build_mini_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    model = new_model(tok_dir, seed=cfg.seed, vit_width=cfg.vit_width)
    load_vision(model, Path(cfg.init))
    model.vision_model.requires_grad_(False)
    model.mlp1.requires_grad_(False)
    carry = CarryHeads.for_run(model.cfg.llm.hidden_size, cfg)
    opt = _optimizer(model, carry, cfg)
    step, elapsed = 0, 0.0
    state = load_state(out / STATE, cfg, SCHEDULE_ONLY)
    if state is not None:
        model.load_state_dict(state["model"])
        carry.load_state_dict(state["carry"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log(out, {"event": "resume", "step": step})
    template = get_template(model.cfg.template)
    params = [p for p in [*model.parameters(), *carry.parameters()] if p.requires_grad]
    model.train()
    t0 = time.perf_counter() - elapsed
    last_save, last_eval = time.perf_counter(), time.perf_counter()
    while step < (cfg.steps if stop_at is None else min(stop_at, cfg.steps)):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.lr, cfg.warmup, cfg.steps, step)
        opt.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        tiles = 0
        for k in range(cfg.images_per_step):
            sample = sample_for(cfg, step, k, tokenizer, template, model.cfg)
            loss, st = forward_loss(model, carry, sample, cfg)
            (loss / cfg.images_per_step).backward()
            tiles += sample.pixel_values.shape[0]
            for key, v in st.items():
                stats[key] = stats.get(key, 0.0) + v / cfg.images_per_step
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        if step % 10 == 0 or step == cfg.steps:
            lr = lr_at(cfg.lr, cfg.warmup, cfg.steps, step - 1)
            log(out, {"step": step, "elapsed": round(now - t0, 1), "lr": round(lr, 6), "tiles": tiles,
                      **{k: round(v, 4) for k, v in stats.items()}})
        if now - last_save >= cfg.checkpoint_minutes * 60 or step in (cfg.steps, stop_at):
            save_state(out / STATE, {"model": model.state_dict(), "carry": carry.state_dict(), "opt": opt.state_dict(), "step": step,
                                     "config": asdict(cfg), "elapsed": now - t0})
            last_save = now
        if cfg.eval_minutes and (now - last_eval >= cfg.eval_minutes * 60 or step == cfg.steps):
            exported = export(model, tok_dir, out / "export")
            report = evaluate(exported, out / "heldout", n=cfg.eval_questions)
            log(out, {"event": "eval", "step": step, "elapsed": round(now - t0, 1), **report})
            model.train()
            last_eval = time.perf_counter()
    return export(model, tok_dir, out / "export")


def main(argv: list[str] | None = None) -> None:
    config_main(train, TrainConfig, argv, prog="python -m training.train", doc=__doc__,
                out_help="run folder (checkpoints, log, export)")


if __name__ == "__main__":
    main()
