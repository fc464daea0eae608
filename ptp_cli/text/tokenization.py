"""Tokenizers: text <-> token ids, behind one small interface, with no remote code ever executed.

Three loaders, tried in order by ``load_tokenizer``:

(a) ``tokenizer.json``: the ``tokenizers`` library (the built-in tiny model, Qwen2/Phi-3 style checkpoints);
(b) InternLM2 (InternVL2-2B/8B): the checkpoint asks for the remote ``InternLM2Tokenizer``; ptp reproduces
    it on top of ``sentencepiece`` (``InternLM2Tokenizer`` below);
(c) anything else: transformers' ``AutoTokenizer`` with ``trust_remote_code=False``.

The tokenizer config files are read by ``ptp_cli.text.tokenizer_files``; the built-in tiny model's tokenizer is
written by ``ptp_cli.builders.bpe``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ptp_cli.errors import ModelLoadError
from ptp_cli.text.tokenizer_files import (
    AddedToken,
    TokenizerFiles,
    clean_up_tokenization,
    read_tokenizer_files,
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# The special tokens of InternVL2-2B, in the order the tiny tokenizer gives them ids.
INTERNVL2_SPECIAL_TOKENS: tuple[str, ...] = (
    UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, "<|im_start|>", "<|im_end|>",
    IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN,
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of ptp needs from a tokenizer. Ids are plain Python ints."""

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: special tokens in the text become single ids; BOS as the checkpoint does."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


# ---------------------------------------------------------------------------------------------------------
# (a) tokenizer.json


class _SpecialIds:
    """bos/eos/pad ids resolved once at load (``_bos``, ``_eos``, ``_pad``), for the tokenizers ptp wraps itself."""

    _bos: int | None
    _eos: int | None
    _pad: int

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad


class FastTokenizer(_SpecialIds):
    """A ``tokenizer.json`` run by the ``tokenizers`` library.

    BOS/EOS: when tokenizer_config.json sets ``add_bos_token``/``add_eos_token`` (Llama-style fast tokenizers
    in transformers rebuild their post-processor from these), they decide; otherwise the post-processor in
    tokenizer.json does.
    """

    def __init__(self, backend: Any, files: TokenizerFiles) -> None:
        self._tok = backend
        self._add_bos = files.flag("add_bos_token")
        self._add_eos = files.flag("add_eos_token")
        self._clean_up = bool(files.flag("clean_up_tokenization_spaces"))
        self._bos = self._id_of(files.special.get("bos_token"))
        self._eos = self._id_of(files.special.get("eos_token"))
        pad = self._id_of(files.special.get("pad_token"))
        self._pad = pad if pad is not None else (self._eos if self._eos is not None else 0)
        special_ids = {idx for idx, tok in backend.get_added_tokens_decoder().items() if tok.special}
        special_ids |= {idx for idx, tok in files.added.items() if tok.special}
        for text in (*files.special.values(), *files.additional):
            if (idx := self._id_of(text)) is not None:
                special_ids.add(idx)
        self._special_ids = frozenset(special_ids)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if self._add_bos is None and self._add_eos is None:
            return list(self._tok.encode(text).ids)
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if self._add_bos and self._bos is not None:
            ids.insert(0, self._bos)
        if self._add_eos and self._eos is not None:
            ids.append(self._eos)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        size = self.vocab_size
        keep = [int(i) for i in ids if 0 <= i < size and not (skip_special_tokens and i in self._special_ids)]
        text = self._tok.decode(keep, skip_special_tokens=False)
        return clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _load_fast(model_dir: Path, files: TokenizerFiles) -> FastTokenizer:
    from tokenizers import Tokenizer as BackendTokenizer

    path = model_dir / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read tokenizer file {path}: {exc}") from exc
    try:
        backend = BackendTokenizer.from_str(text)
    except Exception as exc:
        if type(exc) is not Exception:  # the Rust parser reports a bad file as a bare Exception, nothing else
            raise
        raise ModelLoadError(f"cannot load {path} with the tokenizers library: {exc}") from exc
    return FastTokenizer(backend, files)


# ---------------------------------------------------------------------------------------------------------
# (b) InternLM2 without remote code


class InternLM2Tokenizer(_SpecialIds):
    """ptp's own equivalent of the checkpoint's remote-code ``InternLM2Tokenizer`` (sentencepiece BPE).

    Reproduced behaviour (InternLM2Tokenizer on transformers 4.37-4.4x, the versions InternVL2 targets):
    - encode: split the text on added/special tokens (longest first; ``lstrip``/``rstrip`` flags honoured),
      encode each remaining piece with sentencepiece on its own, prepend BOS (``add_bos_token``, default on),
      append EOS only with ``add_eos_token``. BOS/EOS ids are the sentencepiece model's own.
    - decode: special ids dropped when asked; non-special added tokens, and additional special tokens with
      ids beyond the sentencepiece vocabulary (``<img>``...), become separate words joined by spaces (when
      kept); the runs between them go through sentencepiece's decoder, which drops the dummy-prefix space
      of the first piece; a kept special token in such a run adds a space before the text run preceding
      it unless it follows another special token (an undropped BOS decodes as " <s>...", and
      ``<|im_start|>user<|im_end|>`` as " <|im_start|> user<|im_end|>"); then ``clean_up_tokenization``,
      which InternLM2Tokenizer applies unconditionally (" ," -> ",", " 's" -> "'s", ...).
    Ids outside the vocabulary (a random-weight model can emit them) decode to nothing.
    """

    def __init__(self, sp: Any, files: TokenizerFiles) -> None:
        self._sp = sp
        self._sp_size = sp.get_piece_size()
        self._add_bos = files.flag("add_bos_token") is not False
        self._add_eos = bool(files.flag("add_eos_token"))
        self._clean_up_flag = bool(files.flag("clean_up_tokenization_spaces"))
        # InternLM2Tokenizer's defaults for the special tokens the config leaves out.
        special = {
            "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "pad_token": EOS_TOKEN,
        }
        special.update(files.special)
        self._all_special = frozenset([*special.values(), *files.additional])

        added: dict[int, AddedToken] = dict(files.added)
        encoder = {tok.content: idx for idx, tok in added.items()}
        next_id = max([self._sp_size - 1, *added]) + 1
        # Special tokens not listed as added: their sentencepiece id, else a new id (as transformers does).
        for text in [*special.values(), *files.additional]:
            if text in encoder:
                continue
            sp_id = sp.piece_to_id(text)
            if sp.id_to_piece(sp_id) == text:
                idx = sp_id
            else:
                idx, next_id = next_id, next_id + 1
            added[idx] = AddedToken(text)
            encoder[text] = idx
        self._added = added
        self._encoder = encoder
        self._size = max([self._sp_size - 1, *added]) + 1

        bos, eos = sp.bos_id(), sp.eos_id()
        self._bos = bos if bos >= 0 else encoder.get(special["bos_token"])
        self._eos = eos if eos >= 0 else encoder.get(special["eos_token"])
        pad = self.token_to_id(special["pad_token"])
        self._pad = pad if pad is not None else (self._eos if self._eos is not None else 0)
        self._special_ids = frozenset(self.token_to_id(t) for t in self._all_special) - {None}
        # Added tokens that decode as separate words (transformers' "legacy added tokens").
        self._word_ids = frozenset(
            idx for idx, tok in added.items()
            if tok.content not in self._all_special
            or (tok.content in files.additional and idx >= self._sp_size)
        )
        alternatives = sorted(encoder, key=lambda t: (-len(t), t))
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if encoder else None

    @property
    def vocab_size(self) -> int:
        return self._size

    def token_to_id(self, token: str) -> int | None:
        if token in self._encoder:
            return self._encoder[token]
        idx = self._sp.piece_to_id(token)
        return idx if self._sp.id_to_piece(idx) == token else None

    def _token_text(self, idx: int) -> str:
        tok = self._added.get(idx)
        return tok.content if tok is not None else self._sp.id_to_piece(idx)

    def encode(self, text: str) -> list[int]:
        parts = self._split_re.split(text) if self._split_re is not None else [text]
        # parts alternates text, token, text, ...: tokens sit at odd indices.
        for i in range(1, len(parts), 2):
            tok = self._added[self._encoder[parts[i]]]
            if tok.rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
            if tok.lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
        ids = [self._bos] if self._add_bos and self._bos is not None else []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self._encoder[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if self._add_eos and self._eos is not None:
            ids.append(self._eos)
        return ids

    def _run_to_string(self, run: list[int]) -> str:
        """InternLM2Tokenizer.convert_tokens_to_string on a run of ids."""
        out, pending, prev_special = "", [], False
        for idx in run:
            text = self._token_text(idx)
            if text in self._all_special:
                out += ("" if prev_special else " ") + self._sp.decode(pending) + text
                pending, prev_special = [], True
            else:
                pending.append(idx)
                prev_special = False
        return clean_up_tokenization(out + self._sp.decode(pending))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        words: list[str] = []
        run: list[int] = []
        for raw in ids:
            idx = int(raw)
            if not 0 <= idx < self._size or (idx >= self._sp_size and idx not in self._added):
                continue
            if skip_special_tokens and idx in self._special_ids:
                continue
            if idx in self._word_ids:
                if run and (text := self._run_to_string(run)):
                    words.append(text)
                run = []
                words.append(self._token_text(idx))
            else:
                run.append(idx)
        if run:
            words.append(self._run_to_string(run))
        text = " ".join(words)
        return clean_up_tokenization(text) if self._clean_up_flag else text


def _needs_internlm2(files: TokenizerFiles) -> bool:
    names = [files.config.get("tokenizer_class")]
    auto_map = files.config.get("auto_map")
    if isinstance(auto_map, dict):
        entry = auto_map.get("AutoTokenizer")
        names.extend(entry if isinstance(entry, list) else [entry])
    return any(isinstance(n, str) and n.rsplit(".", 1)[-1].startswith("InternLM2Tokenizer") for n in names)


def _load_internlm2(model_dir: Path, files: TokenizerFiles) -> InternLM2Tokenizer:
    import sentencepiece as spm

    path = model_dir / "tokenizer.model"
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the sentencepiece model {path}: {exc}") from exc
    return InternLM2Tokenizer(sp, files)


# ---------------------------------------------------------------------------------------------------------
# (c) transformers, no remote code


class HFTokenizer:
    """A transformers tokenizer (``AutoTokenizer``, no remote code) behind ptp's interface."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self._vocab = tok.get_vocab()
        self._size = len(tok)

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def pad_id(self) -> int:
        for idx in (self._tok.pad_token_id, self._tok.eos_token_id):
            if idx is not None:
                return idx
        return 0

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        keep = [int(i) for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(keep, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)


class _DropConfigTypeNotice(logging.Filter):
    """Drops transformers' "You are using a model of type internvl_chat to instantiate a model of type ..."
    notice. ``AutoTokenizer`` reads config.json to choose a tokenizer class and, for an InternVL checkpoint
    (a type transformers does not know), falls back to a plain config and says so; the tokenizer is
    unaffected and nothing can be done about it. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type" not in record.getMessage()


@contextmanager
def _without_config_type_notice() -> Iterator[None]:
    """For the duration of ptp's own call: transformers' config logger drops that one notice (then restored)."""
    logger, notice = logging.getLogger("transformers.configuration_utils"), _DropConfigTypeNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _load_auto(model_dir: Path, files: TokenizerFiles) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        with _without_config_type_notice():
            tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        # OSError: files missing or unreadable; ValueError: no tokenizer class for this config; ImportError: a
        # backend (sentencepiece, protobuf) not installed; RuntimeError: sentencepiece rejecting its model file.
        if auto_map := files.config.get("auto_map"):
            raise ModelLoadError(
                f"the tokenizer in {model_dir} is remote code ({json.dumps(auto_map)}), which ptp never runs; "
                "ptp has its own InternLM2Tokenizer and reads any tokenizer.json"
            ) from exc
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
    return HFTokenizer(tok)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The checkpoint's tokenizer, without executing any code from the checkpoint."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"tokenizer folder not found: {model_dir}")
    files = read_tokenizer_files(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return _load_fast(model_dir, files)
    if _needs_internlm2(files):
        if not (model_dir / "tokenizer.model").is_file():
            raise ModelLoadError(f"{model_dir} asks for InternLM2Tokenizer but has no tokenizer.model")
        return _load_internlm2(model_dir, files)
    if not files.config and not (model_dir / "tokenizer.model").is_file():
        raise ModelLoadError(
            f"no tokenizer in {model_dir}: expected tokenizer.json, tokenizer_config.json or tokenizer.model"
        )
    return _load_auto(model_dir, files)
