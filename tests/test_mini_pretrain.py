"""ptp-mini's vision pretraining stage: crops run the real ViT, it resumes exactly, the VQA stage starts from it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ptp_cli.mini.model import build_mini_tokenizer
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.synth import example, render
from training.data import TOKEN_GRID, token_truth
from training.pretrain import (
    FULL_OFFSET,
    STATE,
    AuxHeads,
    PretrainConfig,
    crop_features,
    crops_of,
    load_vision,
    pretrain,
    views_of,
)
from training.train import TrainConfig, train
from training.weights import mimetic_init, new_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    build_mini_tokenizer(d)
    return new_model(d, seed=3)


def test_a_whole_tile_crop_gives_exactly_the_inference_features(model):
    """The crop path is the inference path: a crop covering the whole tile, at corner (0, 0), gives the visual
    tokens ``vision_features`` gives the tile."""
    scene = example(5, 0, max_tiles=1).scene
    pixels = TilingOptions.from_config(model.cfg).preprocess(render(scene))  # [1, 3, 448, 448]
    with torch.no_grad():
        theirs = model.vision_features(pixels)  # features [1, 256, D], cls [1, Cv]
        ours, cls = crop_features(model, pixels, torch.tensor([[0, 0]]))
    torch.testing.assert_close(ours, theirs.features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cls, theirs.cls, atol=1e-5, rtol=1e-4)


def test_each_object_crop_holds_its_object_away_from_the_edge(model):
    tiling = TilingOptions.from_config(model.cfg)
    scene = example(5, 1, max_tiles=1).scene
    pixels, labels, corners = crops_of(5, 1, crop_tokens=6, tiling=tiling)
    truth = token_truth(scene, 1)[0][0].view(TOKEN_GRID, TOKEN_GRID, 4)
    centres = truth[..., 3].nonzero().tolist()
    assert pixels.shape == (len(centres) + 1, 3, 168, 168) and labels.shape == (len(centres) + 1, 36, 4)
    for (ci, cj), (i, j), lab in zip(centres, corners.tolist(), labels, strict=False):
        assert 1 <= ci - i <= 4 or i in (0, TOKEN_GRID - 6)
        assert 1 <= cj - j <= 4 or j in (0, TOKEN_GRID - 6)
        assert torch.equal(lab, truth[i:i + 6, j:j + 6].reshape(36, 4))
        assert lab[(ci - i) * 6 + (cj - j), 3] == 1


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_whole_views_are_a_tile_that_shows_an_object_and_the_thumbnail(model, index: int):
    """Stage 1's whole-view batches (``--full-scenes``): the tiles inference cuts, labelled by the scene's
    geometry; one tile with an object and, for a multi-tile scene, the thumbnail (flagged)."""
    tiling = TilingOptions.from_config(model.cfg)
    scene = example(1, FULL_OFFSET + index).scene
    every = tiling.preprocess(render(scene))  # [T, 3, 448, 448]
    labels, present, _ = token_truth(scene, every.shape[0])
    pixels, got, shown, thumb = views_of(1, index, tiling=tiling)
    if every.shape[0] == 1:
        assert thumb.tolist() == [False] and torch.equal(pixels, every) and torch.equal(got, labels)
        return
    assert thumb.tolist() == [False, True]
    assert torch.equal(pixels[1], every[-1]) and torch.equal(got[1], labels[-1])
    tile = next(t for t in range(every.shape[0] - 1) if torch.equal(every[t], pixels[0]))
    assert torch.equal(got[0], labels[tile]) and torch.equal(shown[0], present[tile])
    assert shown[0, -1] == 1 and (got[0, :, 0] > 0).any()  # the tile shows an object


def test_pretraining_resumes_to_the_same_weights_and_starts_the_vqa_stage(tmp_path: Path):
    cfg = PretrainConfig(steps=2, scenes_per_step=1, warmup=1, probe_every=0, full_scenes=1)
    pretrain(tmp_path / "straight", cfg)
    pretrain(tmp_path / "twice", cfg, stop_at=1)
    assert torch.load(tmp_path / "twice" / STATE, weights_only=True)["step"] == 1
    vision = pretrain(tmp_path / "twice", cfg)
    a = torch.load(tmp_path / "straight" / STATE, weights_only=True)["model"]
    b = torch.load(tmp_path / "twice" / STATE, weights_only=True)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    fresh = new_model(tmp_path / "straight" / "tokenizer", seed=1)
    patches = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(fresh.state_dict()[patches], a[patches])  # the stage trained the ViT
    load_vision(fresh, vision, AuxHeads(128, 32))
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, a[name]), name  # ViT and projector from the stage, the LLM as initialised
    train(tmp_path / "vqa", TrainConfig(steps=1, images_per_step=1, extra_questions=0, warmup=1, eval_minutes=0,
                                        init=str(vision)))



def _object_self_attention(model, pixels: torch.Tensor, patch_colour: torch.Tensor) -> float:
    """Attention mass (ViT layer 0, heads averaged) an object's patch puts on patches of its own colour."""
    layer = model.vision_model.encoder.layers[0]
    x = layer.norm1(model.vision_model.embeddings(pixels))[:, 1:]  # [1, P, C] patches only
    c, h = x.shape[-1], layer.attn.num_heads
    q, k, _ = layer.attn.qkv(x).split(c, dim=-1)
    q, k = (z.view(1, -1, h, c // h).transpose(1, 2) for z in (q, k))  # [1, H, P, hd]
    probs = (q @ k.transpose(-1, -2) * (c // h) ** -0.5).softmax(-1).mean(1)[0]  # [P, P]
    obj = patch_colour > 0
    same = (patch_colour[:, None] == patch_colour[None, :]) & obj[:, None]  # [P, P]
    return (probs * same).sum(-1)[obj].mean().item()


@pytest.mark.parametrize("index", [2, 3, 4])
def test_mimetic_init_starts_object_patches_attending_to_their_object(model, index: int):
    """The default init attends uniformly; the mimetic one groups an object's patches from step 0."""
    scene = example(5, index, max_tiles=1).scene
    pixels = TilingOptions.from_config(model.cfg).preprocess(render(scene))
    colour = token_truth(scene, 1)[0][0, :, 0].view(TOKEN_GRID, TOKEN_GRID)  # [16, 16] per visual token
    patch_colour = colour.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten()  # [1024] per patch
    grouped = copy.deepcopy(model)
    mimetic_init(grouped, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = _object_self_attention(model, pixels, patch_colour)
        mimetic = _object_self_attention(grouped, pixels, patch_colour)
    assert mimetic > 2 * plain, (mimetic, plain)
