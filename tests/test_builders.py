"""The tiny model, random weights of any shape, and built-in names (``ptp_cli.zoo``)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_loading import assert_same_state, small_cfg

from ptp_cli.builders.tiny import TINY, TINY_VERSION, build_random_checkpoint, ensure_tiny, random_state_dict
from ptp_cli.loading import load_config
from ptp_cli.zoo import BUILTINS, load_model, resolve_builtin, resolve_model


def test_tiny_is_deterministic(tmp_path: Path) -> None:
    a, b = ensure_tiny(cache_dir=tmp_path / "a"), ensure_tiny(cache_dir=tmp_path / "b")
    assert a == tmp_path / "a" / TINY_VERSION
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    cfg = load_config(a)
    assert cfg.llm == replace(TINY.llm, vocab_size=cfg.llm.vocab_size) and cfg.vision == TINY.vision
    assert cfg.template == "internlm2-chat"
    with safe_open(a / "model.safetensors", framework="pt") as f:
        assert "language_model.model.layers.0.attention.wqkv.weight" in set(f.keys())


def test_tiny_race(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny(cache_dir=tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / TINY_VERSION] * 3
    assert [p.name for p in tmp_path.iterdir()] == [TINY_VERSION]  # no temporary folder left behind
    load_config(results[0])


def test_load_model_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTP_HOME", str(tmp_path))
    loaded = load_model("tiny", dtype=torch.bfloat16)
    assert loaded.path == tmp_path / "models" / TINY_VERSION
    assert loaded.cfg.name == "tiny"
    assert loaded.image_token_id == loaded.tokenizer.token_to_id("<IMG_CONTEXT>") < loaded.cfg.llm.vocab_size
    model = loaded.model
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad and not p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())
    prompts = ["What is in the image?", "Read the sign.", "How many cats?", "Which year had the most visitors?"]
    ids = torch.tensor([loaded.tokenizer.encode(p)[:4] for p in prompts])
    logits = model.language_model(ids)
    assert logits.shape == (4, 4, loaded.cfg.llm.vocab_size) and torch.isfinite(logits).all()
    # Random weights that still say something: different prompts, different greedy next tokens.
    assert len(set(logits[:, -1].argmax(-1).tolist())) >= 3


def test_random_state_dict_scales() -> None:
    cfg = small_cfg("qwen2")
    a = random_state_dict(cfg, seed=9, dtype=torch.bfloat16)
    b = random_state_dict(cfg, seed=9, dtype=torch.bfloat16)
    assert_same_state(a, b)
    ls = a["vision_model.encoder.layers.0.ls1"].float()
    assert ls.min() >= 0.099 and ls.max() <= 1.004  # [0.1, 1.0], rounded to bf16
    with pytest.raises(ValueError, match="vocab_size"):
        random_state_dict(TINY, seed=0)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_build_random_checkpoint(tmp_path: Path, layout: str) -> None:
    cfg = small_cfg("qwen2", tie=True, vocab_size=600)
    build_random_checkpoint(cfg, tmp_path, seed=10, layout=layout, dtype=torch.bfloat16)
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.cfg.llm == cfg.llm and loaded.image_token_id == loaded.tokenizer.token_to_id("<IMG_CONTEXT>")
    assert_same_state({k: v for k, v in loaded.model.state_dict().items() if k != "language_model.output.weight"},
                      random_state_dict(cfg, seed=10, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------
# Built-in names


def test_builtin_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTP_HOME", str(tmp_path))
    assert "tiny" in BUILTINS
    assert resolve_builtin("tiny") == tmp_path / "models" / TINY_VERSION
    assert resolve_builtin("OpenGVLab/InternVL2-2B") is None and resolve_builtin(str(tmp_path)) is None
    assert resolve_model("tiny") == resolve_builtin("tiny") and resolve_model(str(tmp_path)) == tmp_path
    ckpt = tmp_path / "models" / TINY_VERSION
    loaded = load_model(str(ckpt))  # a path goes straight to the loader and keeps its own name
    assert loaded.path == ckpt and loaded.cfg.name == str(ckpt)
