"""Train ptp-mini on synth scenes, on the CPU, deterministically and resumably.

    python -m ptp_cli.mini.train --out runs/mini --seed 1 --steps 4000

trains ptp's own ``InternVLModel`` (the modules inference runs, with gradients) on ``ptp_cli.synth`` examples
drawn with the training seed (never the held-out evaluation seed). Killed and started again with the same
arguments, it continues from its last checkpoint (weights, optimizer, step) and reaches the same weights as an
uninterrupted run: every example is a pure function of (seed, index) and nothing else draws random numbers.

Losses: next-token cross-entropy on the answers (and the separator that ends each), plus auxiliary vision
losses from the scene's ground truth, standing in for the pretraining a real InternViT gets: each visual token
predicts the colour, shape and glyph of the object under it and whether the object's centre is there; each
tile's CLS predicts which colours and shapes the tile holds (a real ViT's CLS summarises its image the same
way after contrastive pretraining). The auxiliary heads are not part of the exported checkpoint. And a
grounding loss (like the referring/grounding data real InternVL2 is trained on): at LLM layer ``focus_layer``
the position that predicts an answer should put its attention on the visual tokens of the objects the
question is about. Without it, a model this small trained this briefly stays at chance: it learns the answer
priors but not to look.

Curriculum: single-tile scenes first, then ever larger grids; tiles that show no object run the ViT without
gradients (about a third of the cost), since most of a high-resolution canvas is background.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptp_cli.mini.data import CLS_TARGETS, IGNORE, Sample, make_sample
from ptp_cli.mini.evaluate import EVAL_SEED, evaluate
from ptp_cli.mini.model import build_mini_tokenizer, export, new_model
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.models.llm import apply_rope
from ptp_cli.prompts import get_template
from ptp_cli.pruning.scores import attention_rows
from ptp_cli.synth import example, more_questions
from ptp_cli.synth.scene import COLOURS, GLYPHS, SHAPES
from ptp_cli.tokenization import load_tokenizer

STATE = "train_state.pt"
BACKGROUND_WEIGHT = 0.2  # weight of the background tokens' auxiliary loss against the objects' tokens


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1  # training data and init seed; below EVAL_SEED (seeds from there on are held out)
    steps: int = 4000  # optimizer steps
    images_per_step: int = 2  # gradient accumulation: scenes per optimizer step
    extra_questions: int = 5  # further questions about each scene (later turns of the same chat)
    lr: float = 2e-3  # peak AdamW learning rate
    warmup: int = 150  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decay of matrices
    aux_weight: float = 1.0  # weight of the vision auxiliary losses
    focus_weight: float = 0.3  # weight of the grounding loss on the answer positions' attention
    focus_layer: int = 2  # the LLM layer whose attention that loss shapes
    single_tile_until: float = 0.15  # fraction of training on one-tile scenes only
    small_grid_until: float = 0.45  # then scenes of up to 4 tiles until this fraction, then up to 12
    checkpoint_minutes: float = 5.0  # wall-clock minutes between checkpoints
    eval_minutes: float = 20.0  # wall-clock minutes between held-out evaluations (0: never)
    eval_questions: int = 60  # held-out questions per evaluation
    vit_width: int = 32  # ViT width (12 layers, heads of 16 channels); must match --init's
    init: str = ""  # vision.pt of the pretraining stage (ptp_cli.mini.pretrain) to start from; "": from scratch


class AuxHeads(nn.Module):
    """Training-only read-outs of the vision features (not exported)."""

    def __init__(self, llm_width: int, vit_width: int) -> None:
        super().__init__()
        self.colour = nn.Linear(llm_width, len(COLOURS) + 1)
        self.shape = nn.Linear(llm_width, len(SHAPES) + 1)
        self.glyph = nn.Linear(llm_width, len(GLYPHS) + 1)
        self.centre = nn.Linear(llm_width, 2)
        self.cls = nn.Linear(vit_width, CLS_TARGETS)

    def loss(self, features: torch.Tensor, cls: torch.Tensor, sample: Sample, grad_tiles: torch.Tensor) -> torch.Tensor:
        """features [G, 256, D], cls [G, Cv] of the G tiles that ran with gradients."""
        total = F.binary_cross_entropy_with_logits(self.cls(cls), sample.cls_targets[grad_tiles])
        return total + self.token_loss(features.flatten(0, 1), sample.token_labels[grad_tiles].flatten(0, 1))

    def token_loss(self, flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token losses of visual tokens flat [N, D] against their labels [N, 4] (colour, shape, glyph,
        centre)."""
        total = flat.new_zeros(())
        for k, head in enumerate((self.colour, self.shape, self.glyph, self.centre)):
            target = labels[:, k]
            # Objects cover ~2% of the tokens: their tokens and the background's weigh apart, or "nothing
            # here" everywhere is a good enough answer.
            for part, weight in ((target > 0, 1.0), (target == 0, BACKGROUND_WEIGHT)):
                if part.any():
                    total = total + weight * F.cross_entropy(head(flat[part]), target[part])
        return total


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
    return make_sample(ex, extra, tokenizer=tokenizer, template=template, cfg=model_cfg)


def focus_loss(lm, h: torch.Tensor, positions: torch.Tensor, sample: Sample, *, layer: int) -> torch.Tensor | None:
    """-log of the attention mass (mean over heads) each answer position puts on the visual tokens of the
    objects its question is about, at LLM ``layer``; h [1, S, D] is that layer's input. None: nothing to focus."""
    asked = [(r, f) for r, f in zip(sample.answer_rows, sample.focus, strict=True) if f]
    if not asked:
        return None
    block = lm.layers[layer]
    hn = block.attention_norm(h)  # [1, S, D]
    rows = torch.tensor([r for r, _ in asked])[None]  # [1, R]
    lengths = torch.tensor([h.shape[1]])  # [1]: RoPE scaling as for the whole sequence
    cos_q, sin_q = lm.rotary(rows, hn.dtype, lengths=lengths)
    cos_k, sin_k = lm.rotary(positions, hn.dtype, lengths=lengths)
    q = apply_rope(block.attention.project_q(hn[:, rows[0]]), cos_q, sin_q)  # [1, Hq, R, hd]
    k = apply_rope(block.attention.project_k(hn), cos_k, sin_k)  # [1, Hkv, S, hd]
    valid = torch.ones(1, h.shape[1], dtype=torch.bool)
    probs = attention_rows(q, k, rows, valid).mean(1)[0]  # [R, S]
    mass = torch.stack([probs[i, sample.image_start + torch.tensor(f)].sum() for i, (_, f) in enumerate(asked)])
    return -(mass + 1e-6).log().mean()


def forward_loss(
    model: InternVLModel, aux: AuxHeads, sample: Sample, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer loss (+ auxiliary vision and focus losses) of one sample, through the inference modules."""
    lm = model.language_model
    pix, grad_tiles = sample.pixel_values, sample.has_object
    out = model.vision_features(pix[grad_tiles])  # features [G, 256, D], cls [G, Cv]
    feats = torch.empty(pix.shape[0], *out.features.shape[1:])
    feats[grad_tiles] = out.features
    if (~grad_tiles).any():
        with torch.no_grad():
            feats[~grad_tiles] = model.vision_features(pix[~grad_tiles]).features
    visual = feats.flatten(0, 1)  # [T*256, D], tiles in order
    ids, start = sample.ids, sample.image_start
    emb = lm.tok_embeddings(ids)  # [S, D]
    x = torch.cat([emb[:start], visual, emb[start + visual.shape[0]:]])[None]  # [1, S, D]
    s = x.shape[1]
    valid = torch.ones(1, s, dtype=torch.bool)
    positions = torch.arange(s)[None]
    h = lm.run_layers(x, positions, valid, end=cfg.focus_layer)  # [1, S, D]
    focus = focus_loss(lm, h, positions, sample, layer=cfg.focus_layer)
    cos, sin = lm.rotary(positions, h.dtype, lengths=torch.tensor([s]))
    for block in lm.layers[cfg.focus_layer :]:
        h = block(h, cos, sin, None, valid, causal=True).hidden
    targets = sample.labels
    scored = targets != IGNORE
    logits = lm.logits(h[0, scored])  # [A, V]
    lm_loss = F.cross_entropy(logits, targets[scored])
    aux_loss = aux.loss(out.features, out.cls, sample, grad_tiles)
    loss = lm_loss + cfg.aux_weight * aux_loss
    stats = {"lm": lm_loss.item(), "aux": aux_loss.item(), "tok_acc": (logits.argmax(-1) == targets[scored]).float().mean().item()}
    if focus is not None:
        loss = loss + cfg.focus_weight * focus
        stats["focus"] = focus.item()
    return loss, stats


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _optimizer(model: nn.Module, aux: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in [*model.parameters(), *aux.parameters()] if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def load_vision(model: InternVLModel, aux: AuxHeads, path: Path) -> None:
    """Start from a pretrained vision side: ViT, projector and token heads (``ptp_cli.mini.pretrain``)."""
    state = torch.load(path, weights_only=True)
    heads = {k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")}
    aux.load_state_dict(heads)
    vision = {k: v for k, v in state.items() if not k.startswith("heads.")}
    missing, unexpected = model.load_state_dict(vision, strict=False)
    if unexpected or any(k.startswith(("vision_model.", "mlp1.")) for k in missing):
        raise ValueError(f"{path} is not a ptp-mini vision state (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _save(out: Path, model, aux, opt, step: int, cfg: TrainConfig, elapsed: float) -> None:
    tmp = out / (STATE + ".tmp")
    torch.save(
        {"model": model.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict(), "step": step,
         "config": asdict(cfg), "elapsed": elapsed},
        tmp,
    )
    os.replace(tmp, out / STATE)  # atomic: a kill mid-save keeps the previous checkpoint


def _results_part(config: dict) -> dict:
    """The settings that change the weights (how often to save or evaluate does not)."""
    return {k: v for k, v in config.items() if k not in ("checkpoint_minutes", "eval_minutes", "eval_questions")}


def _log(out: Path, record: dict) -> None:
    with (out / "train.log").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(out: Path, cfg: TrainConfig, *, stop_at: int | None = None) -> Path:
    """Train (or resume) into ``out``; returns the exported checkpoint directory ``out/export``.

    ``stop_at``: save and return after that step (a planned interruption; the run resumes from there)."""
    if not 0 <= cfg.seed < EVAL_SEED:
        raise ValueError(f"seeds {EVAL_SEED} and up are held out for evaluation; train with a seed in [0, {EVAL_SEED})")
    torch.set_num_threads(1)
    out = Path(out)
    tok_dir = out / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    if not (tok_dir / "tokenizer.json").is_file():
        build_mini_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    model = new_model(tok_dir, seed=cfg.seed, vit_width=cfg.vit_width)
    aux = AuxHeads(model.cfg.llm.hidden_size, model.cfg.vision.hidden_size)
    if cfg.init:
        load_vision(model, aux, Path(cfg.init))
    opt = _optimizer(model, aux, cfg)
    step, elapsed = 0, 0.0
    if (out / STATE).is_file():
        state = torch.load(out / STATE, weights_only=True)
        if _results_part(state["config"]) != _results_part(asdict(cfg)):
            raise ValueError(f"{out} holds a run with other settings: {state['config']}")
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        _log(out, {"event": "resume", "step": step})
    template = get_template(model.cfg.template)
    model.train()
    t0 = time.perf_counter() - elapsed
    last_save, last_eval = time.perf_counter(), time.perf_counter()
    while step < (cfg.steps if stop_at is None else min(stop_at, cfg.steps)):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        tiles = 0
        for k in range(cfg.images_per_step):
            sample = sample_for(cfg, step, k, tokenizer, template, model.cfg)
            loss, st = forward_loss(model, aux, sample, cfg)
            (loss / cfg.images_per_step).backward()
            tiles += sample.pixel_values.shape[0]
            for key, v in st.items():
                stats[key] = stats.get(key, 0.0) + v / cfg.images_per_step
        nn.utils.clip_grad_norm_([*model.parameters(), *aux.parameters()], 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        if step % 10 == 0 or step == cfg.steps:
            _log(out, {"step": step, "elapsed": round(now - t0, 1), "lr": round(lr_at(cfg, step - 1), 6),
                       "tiles": tiles, **{k: round(v, 4) for k, v in stats.items()}})
        if now - last_save >= cfg.checkpoint_minutes * 60 or step in (cfg.steps, stop_at):
            _save(out, model, aux, opt, step, cfg, now - t0)
            last_save = now
        if cfg.eval_minutes and (now - last_eval >= cfg.eval_minutes * 60 or step == cfg.steps):
            exported = export(model, tok_dir, out / "export")
            report = evaluate(exported, out / "heldout", n=cfg.eval_questions)
            _log(out, {"event": "eval", "step": step, "elapsed": round(now - t0, 1), **report})
            model.train()
            last_eval = time.perf_counter()
    return export(model, tok_dir, out / "export")


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def config_main(run, config_cls, argv: list[str] | None, *, prog: str, doc: str, out_help: str) -> None:
    """A stage's command line: ``--out`` plus one option per field of its config dataclass."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    for name, default in asdict(config_cls()).items():
        kind = _flag if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    print(run(out, config_cls(**args)))


def main(argv: list[str] | None = None) -> None:
    config_main(train, TrainConfig, argv, prog="python -m ptp_cli.mini.train", doc=__doc__,
                out_help="run folder (checkpoints, log, export)")


if __name__ == "__main__":
    main()
