"""The files of a checkpoint directory: JSON configs, its layout, and its safetensors weight files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError, safe_open

from ptp_cli.errors import ModelLoadError

Layout = Literal["original", "hf"]

# Where each layout may store an LM head (its presence unties a head the config declares tied).
HEAD_KEYS = ("language_model.output.weight", "language_model.lm_head.weight", "lm_head.weight")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path.parent} is not a model checkpoint: no {path.name}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def detect_layout(raw: dict[str, Any], where: Path) -> Layout:
    """``original`` (OpenGVLab's InternVLChatModel) or ``hf`` (transformers' InternVLForConditionalGeneration)."""
    archs = raw.get("architectures") or []
    if raw.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in archs:
        return "hf"
    if raw.get("model_type") == "internvl_chat" or "InternVLChatModel" in archs or "llm_config" in raw:
        return "original"
    what = raw.get("model_type") or (archs[0] if archs else "unknown")
    raise ModelLoadError(
        f"unsupported checkpoint in {where}: model type {what!r} (ptp reads InternVLChatModel and "
        "InternVLForConditionalGeneration checkpoints)"
    )


def few(names: set[str] | list[str], n: int = 5) -> str:
    """The first ``n`` names, sorted, for an error message."""
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        files = sorted({model_dir / name for name in weight_map.values()})
        if missing := [f.name for f in files if not f.is_file()]:
            raise ModelLoadError(f"{model_dir} is missing weight shards: {', '.join(missing[:5])}")
        return files
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    legacy = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if legacy:
        raise ModelLoadError(
            f"{model_dir} has only PyTorch pickle weights ({', '.join(legacy[:3])}); ptp reads safetensors only, "
            "so convert them to safetensors first (e.g. load with transformers and save_pretrained)"
        )
    raise ModelLoadError(f"no weights in {model_dir}: expected model.safetensors or model.safetensors.index.json")


def has_weights(model_dir: Path) -> bool:
    try:
        weight_files(model_dir)
    except ModelLoadError:
        return False
    return True


def open_weights(model_dir: Path) -> Iterator[Any]:
    """A safetensors handle per weight file (headers read; tensors are read on ``get_tensor``)."""
    for f in weight_files(model_dir):
        try:
            yield safe_open(f, framework="pt")
        except (OSError, SafetensorError) as exc:  # SafetensorError: a corrupt or truncated header
            raise ModelLoadError(f"cannot read {f}: {exc}") from exc


def stored_keys(model_dir: Path) -> set[str] | None:
    """Names of the stored tensors (headers only), or None when there are no weight files yet."""
    if not has_weights(model_dir):
        return None
    keys: set[str] = set()
    for handle in open_weights(model_dir):
        keys.update(handle.keys())
    return keys
