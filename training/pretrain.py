"""Stage 1 of ptp-mini: pretrain the vision side (InternViT + projector) alone on the scenes' dense labels.

    python -m training.pretrain --out runs/vit --seed 1

From scratch, the full VQA loop learns colours at once but shapes and glyphs very slowly (a ViT has no
locality prior, and each step sees two scenes whose objects cover ~2% of the tokens), so the LLM cannot find
the object a question names. This stage stands in for a real InternViT's pretraining, cheaply: it trains on
small crops around the objects (6 x 6 visual tokens, 12 x 12 patches: ~1/7 of a tile, mostly object), many
per step, with the same per-token losses as the VQA stage (colour, shape, glyph, object centre). A crop runs
the real ViT layers with the position embeddings of the patches it covers, so the weights transfer unchanged
to full 448 px tiles. ``python -m training.train --init RUN/vision.pt`` starts the VQA stage from it (the
shipped recipe, ``training.recipe``, runs this stage twice: 1a, then 1b from 1a's ``vision.pt``).

With ``--full-scenes N`` each step also trains on whole 448 px views (a tile with an object and the thumbnail
of N scenes of 1 to 12 tiles), through exactly the inference path: thumbnails shrink objects below any crop's.

Deterministic for a seed (crops are a pure function of seed and index; one thread) and resumable like the
VQA stage (``train_state.pt``, atomic, every few minutes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptp_cli.mini.model import build_mini_tokenizer
from ptp_cli.models.internvl import InternVLModel, pixel_shuffle
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.synth import example, render
from ptp_cli.synth.scene import COLOURS, GLYPHS, SHAPES
from training.data import CLS_TARGETS, TOKEN_GRID, TOKEN_PX, token_truth
from training.runs import config_main, load_state, log, lr_at, save_state
from training.weights import mimetic_init, new_model

STATE = "train_state.pt"
VISION = "vision.pt"  # the stage's product: vision_model.*, mlp1.* and the token heads, for --init
BACKGROUND_WEIGHT = 0.2  # weight of the background tokens' losses against the objects' tokens
PROBE_SEED = 999  # unseen scenes for the probe (below EVAL_SEED, never a training seed of this stage)


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 1  # data and init seed (the VQA stage's init seed, so the LLM part is the same)
    steps: int = 6000  # optimizer steps (shapes are read at ~97% after 4000)
    scenes_per_step: int = 8  # single-tile scenes per step; every object gives one crop, plus one background crop
    vit_width: int = 32  # ViT width (12 layers, heads of 16 channels)
    mimetic: bool = True  # mimetic init of the ViT's attention (a grouping prior; see mini.model.mimetic_init)
    crop_tokens: int = 6  # crop side in visual tokens (2 patches each)
    lr: float = 6e-3  # peak AdamW learning rate
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decay of matrices
    checkpoint_minutes: float = 5.0  # wall-clock minutes between checkpoints
    probe_every: int = 250  # steps between probes of the token read-outs on unseen scenes (0: never)
    cls_weight: float = 1.0  # weight of the CLS loss: the crop's CLS predicts which colours and shapes it shows
    place_weight: float = 0.5  # weight of the place loss: each token predicts its row and column in the tile
    init: str = ""  # a vision.pt to continue from (a fresh schedule on trained weights); "": from scratch
    full_scenes: int = 0  # scenes of 1..12 tiles per step whose whole views (a tile with an object, and the
    # thumbnail) train beside the crops: token place learnt on crops does not carry over to whole views


class AuxHeads(nn.Module):
    """Training-only read-outs of the vision features (not exported): per token and of the CLS."""

    def __init__(self, llm_width: int, vit_width: int, *, place: bool = True) -> None:
        super().__init__()
        self.colour = nn.Linear(llm_width, len(COLOURS) + 1)
        self.shape = nn.Linear(llm_width, len(SHAPES) + 1)
        self.glyph = nn.Linear(llm_width, len(GLYPHS) + 1)
        self.centre = nn.Linear(llm_width, 2)
        # The place head exists only when its loss is on: a run without it draws its initial weights exactly
        # as runs did before the head existed (the shipped stage 1a is one of those; see docs/accuracy.md).
        self.place = nn.Linear(llm_width, 2 * TOKEN_GRID) if place else None  # the token's row, then column
        self.cls = nn.Linear(vit_width, CLS_TARGETS)

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


def load_vision(model: InternVLModel, path: Path, heads: AuxHeads | None = None) -> None:
    """Load a stage-1 product (``vision.pt``): ViT and projector into ``model``, token heads into ``heads``."""
    state = torch.load(path, weights_only=True)
    if heads is not None:
        saved = {k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")}
        if heads.place is None:
            saved = {k: v for k, v in saved.items() if not k.startswith("place.")}
        missing, unexpected = heads.load_state_dict(saved, strict=False)
        if unexpected or any(not k.startswith("place.") for k in missing):  # older states lack "place"
            raise ValueError(f"{path} holds other token heads (missing {missing[:3]}, unexpected {unexpected[:3]})")
    vision = {k: v for k, v in state.items() if not k.startswith("heads.")}
    missing, unexpected = model.load_state_dict(vision, strict=False)
    if unexpected or any(k.startswith(("vision_model.", "mlp1.")) for k in missing):
        raise ValueError(f"{path} is not a ptp-mini vision state (missing {missing[:3]}, unexpected {unexpected[:3]})")


Crops = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # pixels [N, 3, 28c, 28c], labels [N, c*c, 4], corners [N, 2]


def crops_of(seed: int, index: int, *, crop_tokens: int, tiling: TilingOptions) -> Crops:
    """Crops of the ``index``-th single-tile scene of ``seed``: pixels [N, 3, 28c, 28c], token labels
    [N, c*c, 4] and each crop's top-left token (row, col) [N, 2]; one crop per object (the object's centre
    token at a random place at least one token from the crop's edge) and one at random."""
    rng = np.random.default_rng([seed, index, 11])
    ex = example(seed, index, max_tiles=1)
    pixels = tiling.preprocess(render(ex.scene))[0]  # [3, 448, 448]
    labels = token_truth(ex.scene, 1)[0][0].view(TOKEN_GRID, TOKEN_GRID, 4)  # [16, 16, 4]
    c, top = crop_tokens, TOKEN_GRID - crop_tokens
    corners = []
    for ci, cj in labels[..., 3].nonzero().tolist():  # object centres
        i, j = ci - rng.integers(1, c - 1), cj - rng.integers(1, c - 1)
        corners.append([int(np.clip(i, 0, top)), int(np.clip(j, 0, top))])
    corners.append(rng.integers(0, top + 1, size=2).tolist())
    px = [pixels[:, i * TOKEN_PX:(i + c) * TOKEN_PX, j * TOKEN_PX:(j + c) * TOKEN_PX] for i, j in corners]
    lab = [labels[i:i + c, j:j + c].reshape(c * c, 4) for i, j in corners]
    return torch.stack(px), torch.stack(lab), torch.tensor(corners)


def crop_features(
    model: InternVLModel, pixels: torch.Tensor, corners: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual tokens [N, c*c, D] and last-layer CLS [N, Cv] of crops [N, 3, 28c, 28c] whose top-left tokens
    are ``corners`` [N, 2]: the ViT's own layers, each patch with the position embedding it has in a full tile."""
    vit, g = model.vision_model, model.cfg.vision.grid
    emb = vit.embeddings
    x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, P, C], P = (2c)^2 patches row-major
    n, p, _ = x.shape
    side = round(p**0.5)
    f = model.cfg.shuffle_factor
    rows = corners[:, :1, None] * f + torch.arange(side)[None, :, None]  # [N, side, 1] patch rows
    cols = corners[:, 1:, None] * f + torch.arange(side)[None, None, :]  # [N, 1, side]
    index = (1 + rows * g + cols).flatten(1)  # [N, P] into the 1 + g*g position table
    pos = emb.position_embedding[0]  # [1 + g*g, C]
    x = torch.cat([emb.class_embedding.expand(n, -1, -1) + pos[0], x + pos[index]], dim=1)  # [N, 1 + P, C]
    for layer in vit.encoder.layers:
        x, _ = layer(x)
    merged = pixel_shuffle(x[:, 1:].reshape(n, side, side, -1), factor=f, version=model.cfg.ps_version)
    return model.mlp1(merged.flatten(1, 2)), x[:, 0]  # [N, c*c, D], [N, Cv]


FULL_OFFSET = 10_000_000  # whole-view scenes are indexed apart from the crops' single-tile scenes


def views_of(seed: int, index: int, *, tiling: TilingOptions) -> tuple[torch.Tensor, ...]:
    """Whole 448 px views of the ``index``-th scene of 1..12 tiles: pixels [V, 3, 448, 448], token labels
    [V, 256, 4], what each view shows [V, CLS_TARGETS] and whether it is a thumbnail [V]; V = 1 (a single tile)
    or 2 (a random tile that shows an object, and the thumbnail, whose token places are places on the
    canvas)."""
    rng = np.random.default_rng([seed, index, 13])
    scene = example(seed, FULL_OFFSET + index).scene
    pixels = tiling.preprocess(render(scene))  # [T, 3, 448, 448]
    n = pixels.shape[0]
    labels, present, _ = token_truth(scene, n)
    if n == 1:
        pick = [0]
    else:
        shown = (present[:-1, -1] > 0).nonzero()[:, 0]
        pick = [int(shown[int(rng.integers(len(shown)))]), n - 1]
    thumb = torch.tensor([n > 1 and p == n - 1 for p in pick])  # [V]
    return pixels[pick], labels[pick], present[pick], thumb


def full_batch(seed: int, first: int, n: int, tiling: TilingOptions) -> tuple[torch.Tensor, ...]:
    """``views_of`` the scenes first .. first + n - 1, concatenated."""
    parts = [views_of(seed, first + k, tiling=tiling) for k in range(n)]
    return tuple(torch.cat(z) for z in zip(*parts, strict=True))


def full_loss(model: InternVLModel, heads, cfg: PretrainConfig, views) -> torch.Tensor:
    """The crops' losses on whole views (pixels [V, 3, 448, 448], labels [V, 256, 4], presence [V, K])."""
    pixels, labels, present, _ = views
    corners = torch.zeros(pixels.shape[0], 2, dtype=torch.long)
    feats, cls = crop_features(model, pixels, corners)  # [V, 256, D], [V, Cv]: exactly the inference features
    loss = heads.token_loss(feats.flatten(0, 1), labels.flatten(0, 1))
    if cfg.place_weight:
        objects = labels.flatten(0, 1)[:, 0] > 0
        loss = loss + cfg.place_weight * place_loss(heads, feats.flatten(0, 1), corners, TOKEN_GRID, objects)
    if cfg.cls_weight:
        loss = loss + cfg.cls_weight * F.binary_cross_entropy_with_logits(heads.cls(cls), present)
    return loss


def batch(cfg: PretrainConfig, seed: int, first: int, n: int, tiling: TilingOptions) -> Crops:
    parts = [crops_of(seed, first + k, crop_tokens=cfg.crop_tokens, tiling=tiling) for k in range(n)]
    return tuple(torch.cat(z) for z in zip(*parts, strict=True))


@torch.no_grad()
def probe(model: InternVLModel, heads, cfg: PretrainConfig, tiling: TilingOptions, *, scenes: int = 40) -> dict[str, float]:
    """Accuracy of the colour, shape and glyph read-outs on object tokens (and of the centre read-out on
    centre tokens) of crops from unseen scenes (seed PROBE_SEED)."""
    pixels, labels, corners = batch(cfg, PROBE_SEED, 0, scenes, tiling)
    feats, cls = crop_features(model, pixels, corners)
    flat = feats.flatten(0, 1)  # [N*c*c, D]
    present = crop_presence(labels)
    labels = labels.flatten(0, 1)
    out = {}
    for k, name in enumerate(("colour", "shape", "glyph", "centre")):
        target = labels[:, k]
        part = target > 0
        pred = (heads.colour, heads.shape, heads.glyph, heads.centre)[k](flat[part]).argmax(-1)
        out[name] = round((pred == target[part]).float().mean().item(), 4)
    if heads.place is not None:
        rows, cols = places(corners, cfg.crop_tokens)
        logits = heads.place(flat)
        hit = (logits[:, :TOKEN_GRID].argmax(-1) == rows) & (logits[:, TOKEN_GRID:].argmax(-1) == cols)
        out["place"] = round(hit.float().mean().item(), 4)
    out["cls"] = round(((heads.cls(cls) > 0).float() == present).float().mean().item(), 4)
    if heads.place is not None:  # whole views as inference sees them: object tokens' place, thumbnails' shapes
        pixels, labels, _, thumb = full_batch(PROBE_SEED, 0, scenes // 4, tiling)
        feats, _ = crop_features(model, pixels, torch.zeros(pixels.shape[0], 2, dtype=torch.long))
        rows, cols = places(torch.zeros(pixels.shape[0], 2, dtype=torch.long), TOKEN_GRID)
        flat, labels = feats.flatten(0, 1), labels.flatten(0, 1)
        part = labels[:, 0] > 0
        logits = heads.place(flat[part])
        hit = (logits[:, :TOKEN_GRID].argmax(-1) == rows[part]) & (logits[:, TOKEN_GRID:].argmax(-1) == cols[part])
        out["view_place"] = round(hit.float().mean().item(), 4)
        part = part & thumb.repeat_interleave(TOKEN_GRID**2) & (labels[:, 1] > 0)
        out["view_shape_thumb"] = round((heads.shape(flat[part]).argmax(-1) == labels[part, 1]).float().mean().item(), 4)
    return out


def places(corners: torch.Tensor, crop_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile rows and columns [N*c*c] of the tokens of crops with top-left tokens ``corners`` [N, 2]."""
    local = torch.arange(crop_tokens)
    rows = (corners[:, 0, None, None] + local[None, :, None]).expand(-1, -1, crop_tokens)  # [N, c, c]
    cols = (corners[:, 1, None, None] + local[None, None, :]).expand(-1, crop_tokens, -1)
    return rows.flatten(), cols.flatten()


def place_loss(
    heads, flat: torch.Tensor, corners: torch.Tensor, crop_tokens: int, objects: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of each token's row and column read-out (flat [N*c*c, D]): keeps where a token lies in
    the features, which relative-position questions need. With ``objects`` [N*c*c] bool, the objects' tokens
    and the background's weigh apart (as in ``token_loss``): on whole views objects are ~2% of the tokens,
    and their features would otherwise trade place for what they show."""
    rows, cols = places(corners, crop_tokens)
    logits = heads.place(flat)
    if objects is None:
        return F.cross_entropy(logits[:, :TOKEN_GRID], rows) + F.cross_entropy(logits[:, TOKEN_GRID:], cols)
    per = (F.cross_entropy(logits[:, :TOKEN_GRID], rows, reduction="none")
           + F.cross_entropy(logits[:, TOKEN_GRID:], cols, reduction="none"))  # [N*c*c]
    total = per.new_zeros(())
    for part, weight in ((objects, 1.0), (~objects, BACKGROUND_WEIGHT)):
        if part.any():
            total = total + weight * per[part].mean()
    return total


def crop_presence(labels: torch.Tensor) -> torch.Tensor:
    """[N, CLS_TARGETS] float: which colours and shapes each crop shows (any token), and whether any object,
    from token labels [N, c*c, 4] (the targets of the CLS read-out, as for whole tiles in the VQA stage)."""
    n = labels.shape[0]
    colours = F.one_hot(labels[..., 0], len(COLOURS) + 1).amax(1)[:, 1:]  # [N, colours]
    shapes = F.one_hot(labels[..., 1], len(SHAPES) + 1).amax(1)[:, 1:]  # [N, shapes]
    anything = (labels[..., 0] > 0).any(1, keepdim=True)
    return torch.cat([colours, shapes, anything], dim=1).float().reshape(n, CLS_TARGETS)


def pretrain(out: Path, cfg: PretrainConfig, *, stop_at: int | None = None) -> Path:
    """Pretrain (or resume) into ``out``; returns ``out/vision.pt``."""
    if not 0 <= cfg.seed < PROBE_SEED:
        raise ValueError(f"seeds {PROBE_SEED} and up are held out; pretrain with a seed in [0, {PROBE_SEED})")
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_mini_tokenizer(tok_dir)
    model = new_model(tok_dir, seed=cfg.seed, vit_width=cfg.vit_width)
    if cfg.mimetic:
        mimetic_init(model, generator=torch.Generator().manual_seed(cfg.seed))
    model.language_model.requires_grad_(False)
    heads = AuxHeads(model.cfg.llm.hidden_size, model.cfg.vision.hidden_size, place=cfg.place_weight > 0)
    if cfg.init:
        load_vision(model, Path(cfg.init), heads)
    params = [*model.vision_model.parameters(), *model.mlp1.parameters(), *heads.parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    step, elapsed = 0, 0.0
    state = load_state(out / STATE, cfg, ("checkpoint_minutes", "probe_every"))
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
    tiling = TilingOptions.from_config(model.cfg)
    t0, last_save = time.perf_counter() - elapsed, time.perf_counter()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.lr, cfg.warmup, cfg.steps, step)
        pixels, labels, corners = batch(cfg, cfg.seed, step * cfg.scenes_per_step, cfg.scenes_per_step, tiling)
        feats, cls = crop_features(model, pixels, corners)  # [N, c*c, D], [N, Cv]
        loss = heads.token_loss(feats.flatten(0, 1), labels.flatten(0, 1))
        if cfg.place_weight:
            loss = loss + cfg.place_weight * place_loss(heads, feats.flatten(0, 1), corners, cfg.crop_tokens)
        if cfg.cls_weight:
            loss = loss + cfg.cls_weight * F.binary_cross_entropy_with_logits(heads.cls(cls), crop_presence(labels))
        if cfg.full_scenes:
            views = full_batch(cfg.seed, step * cfg.full_scenes, cfg.full_scenes, tiling)
            loss = loss + full_loss(model, heads, cfg, views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        record: dict = {}
        if step % 10 == 0:
            record = {"step": step, "elapsed": round(now - t0, 1), "loss": round(loss.item(), 4)}
        if cfg.probe_every and (step % cfg.probe_every == 0 or step == end):
            record = {"step": step, "elapsed": round(now - t0, 1), "loss": round(loss.item(), 4),
                      "probe": probe(model, heads, cfg, tiling)}
        if record:
            log(out, record)
        if now - last_save >= cfg.checkpoint_minutes * 60 or step == end:
            save_state(out / STATE, {"model": model.state_dict(), "heads": heads.state_dict(),
                                     "opt": opt.state_dict(), "step": step, "config": asdict(cfg),
                                     "elapsed": now - t0})
            last_save = now
    vision = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "mlp1."))}
    vision.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    torch.save(vision, out / VISION)
    return out / VISION


def main(argv: list[str] | None = None) -> None:
    config_main(pretrain, PretrainConfig, argv, prog="python -m training.pretrain", doc=__doc__,
                out_help="run folder (checkpoint, log, vision.pt)")


if __name__ == "__main__":
    main()
