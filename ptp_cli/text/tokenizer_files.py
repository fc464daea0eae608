"""A checkpoint's tokenizer configuration (tokenizer_config.json, special_tokens_map.json, added_tokens.json),
read the way transformers reads it, for the tokenizers in ``ptp_cli.text.tokenization``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptp_cli.errors import ModelLoadError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool = True
    lstrip: bool = False  # eat whitespace on the left when splitting
    rstrip: bool = False  # eat whitespace on the right when splitting


@dataclass
class TokenizerFiles:
    """The parts of a checkpoint's tokenizer config that ptp honours."""

    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json as read
    special: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token/unk_token/pad_token -> text
    additional: list[str] = field(default_factory=list)  # additional_special_tokens
    added: dict[int, AddedToken] = field(default_factory=dict)  # added_tokens_decoder (+ added_tokens.json)

    def flag(self, key: str) -> bool | None:
        value = self.config.get(key)
        return value if isinstance(value, bool) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read tokenizer file {path}: {exc}") from exc


def _content(value: Any) -> str | None:
    """A special token as written in a config: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_files(model_dir: Path) -> TokenizerFiles:
    files = TokenizerFiles()
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{cfg_path} is not a JSON object")
        files.config = cfg
    maps = [files.config]
    map_path = model_dir / "special_tokens_map.json"
    if map_path.is_file() and isinstance(m := _read_json(map_path), dict):
        maps.append(m)  # special_tokens_map.json wins over tokenizer_config.json, as in transformers
    for m in maps:
        for key in SPECIAL_KEYS:
            if (text := _content(m.get(key))) is not None:
                files.special[key] = text
        extra = m.get("additional_special_tokens") or m.get("extra_special_tokens")
        if isinstance(extra, list):
            files.additional = [t for t in map(_content, extra) if t is not None]
    for key, entry in (files.config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            files.added[int(key)] = AddedToken(
                entry["content"], special=bool(entry.get("special", False)),
                lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
            )
    legacy_path = model_dir / "added_tokens.json"
    if legacy_path.is_file() and isinstance(legacy := _read_json(legacy_path), dict):
        known = {t.content for t in files.added.values()}
        specials = set(files.special.values()) | set(files.additional)
        for text, idx in legacy.items():
            if text not in known and isinstance(idx, int):
                files.added[idx] = AddedToken(text, special=text in specials)
    return files


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------------------------------------------
