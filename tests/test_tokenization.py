"""Tokenizers: the built-in tiny one, and the InternLM2 (remote-code) one reproduced without remote code.

References: the tiny tokenizer against transformers' own loader of the same files; the InternLM2 tokenizer
against sentencepiece itself (plain text) and against transformers' Python tokenizer machinery
(``SentencePieceBackend``, legacy mode: added-token splitting + per-chunk sentencepiece encoding, which is
what the remote InternLM2Tokenizer inherits). Decoding quirks of InternLM2Tokenizer on transformers 4.x are
checked against hand-written strings.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_cli.builders.bpe import build_tiny_tokenizer
from ptp_cli.errors import ModelLoadError
from ptp_cli.text.tokenization import (
    INTERNVL2_SPECIAL_TOKENS,
    FastTokenizer,
    InternLM2Tokenizer,
    Tokenizer,
    load_tokenizer,
)

# Text without special-token spellings: letters, digits, punctuation, spaces, newlines, CJK, accents, emoji.
TEXT = st.text(
    alphabet=st.characters(
        whitelist_categories=("L", "N", "P", "S", "Zs"), blacklist_characters="<>", max_codepoint=0x1FAFF
    )
    | st.sampled_from(" \n\t"),
    max_size=40,
)


# ---------------------------------------------------------------------------------------------------------
# The tiny tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer_dir: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_build_is_deterministic(tmp_path: Path, tokenizer_dir: Path) -> None:
    build_tiny_tokenizer(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(tokenizer_dir)
    assert set(_files(tokenizer_dir)) == {"tokenizer.json", "tokenizer_config.json"}
    # Another process with another hash seed writes the same bytes.
    code = (
        "import sys; from pathlib import Path; "
        "from ptp_cli.builders.bpe import build_tiny_tokenizer as b; b(Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env)
    assert _files(tmp_path / "other") == _files(tokenizer_dir)


def test_tiny_loads_as_fast_tokenizer(tiny: Tokenizer) -> None:
    assert isinstance(tiny, FastTokenizer)
    assert isinstance(tiny, Tokenizer)
    assert (tiny.token_to_id("<unk>"), tiny.bos_id, tiny.eos_id, tiny.pad_id) == (0, 1, 2, 2)
    assert tiny.token_to_id("no such token") is None
    ids = [tiny.token_to_id(t) for t in INTERNVL2_SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and max(ids) == tiny.vocab_size - 1  # specials come last
    assert tiny.vocab_size > 3 + 256 + 100  # bytes plus learnt merges


@pytest.mark.parametrize("token", INTERNVL2_SPECIAL_TOKENS)
def test_tiny_special_tokens_are_single_ids(tiny: Tokenizer, token: str) -> None:
    idx = tiny.token_to_id(token)
    assert tiny.encode(token) == [tiny.bos_id, idx]
    assert tiny.encode(f"a{token}b") == [tiny.bos_id, *tiny.encode("a")[1:], idx, *tiny.encode("b")[1:]]
    assert tiny.decode([idx], skip_special_tokens=False) == token
    assert tiny.decode([idx]) == ""


def test_tiny_merges_common_words(tiny: Tokenizer) -> None:
    question = "What colour is the car in the image?"
    assert len(tiny.encode(question)) - 1 < len(question.encode()) // 2  # real merges, not bytes


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_tiny_round_trip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert ids[0] == tiny.bos_id
    assert tiny.decode(ids) == text
    assert tiny.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_tiny_decode_with_special_tokens(tiny: Tokenizer) -> None:
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?<|im_end|>"
    ids = tiny.encode(text)
    assert tiny.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tiny.decode(ids) == "user\n\nWhat is this?"
    # Ids outside the vocabulary (a random-weight model may emit them) are dropped.
    assert tiny.decode([*ids, tiny.vocab_size, 10**9, -1]) == "user\n\nWhat is this?"


def test_tiny_matches_transformers(tokenizer_dir: Path, tiny: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert len(ref) == tiny.vocab_size
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (tiny.bos_id, tiny.eos_id, tiny.pad_id)
    texts = ("Hello world", "<|im_start|>system\nhi<|im_end|><img><IMG_CONTEXT></img>\nQ?", " x\n\ny 你好 ok")
    for text in texts:
        ids = tiny.encode(text)
        assert ids == ref.encode(text)
        assert tiny.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tiny.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_tiny_extra_special_tokens(tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path, extra_special_tokens=("<|end|>", "<|user|>"))
    tok = load_tokenizer(tmp_path)
    user, end = tok.token_to_id("<|user|>"), tok.token_to_id("<|end|>")
    assert tok.encode("<|user|>hi<|end|>") == [1, user, *tok.encode("hi")[1:], end]
    assert tok.token_to_id("<|end|>") == tok.vocab_size - 2


# ---------------------------------------------------------------------------------------------------------
# InternLM2: a checkpoint-like folder around a sentencepiece model trained in the test

_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What colour is the car in the picture? The car is red.",
    "How many people are standing near the bus? There are three people.",
    "Describe the image in detail, including the text on the sign.",
    "The chart shows sales per year; which year had the highest sales?",
    "Answer with a single word. It's a cat, isn't it? They're here.",
    "图片里有什么？ 一只猫在沙发上。",
]
# InternLM2 keeps its chat tokens inside the sentencepiece model; the image tokens come after it.
_SP_USER_DEFINED = ["<|im_start|>", "<|im_end|>"]
_IMAGE_TOKENS = [
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]
_PLAIN_ADDED = "<|tool|>"  # an added token that is not special


def _added(content: str, *, special: bool = True) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def write_internlm2_checkpoint(out: Path, *, add_dummy_prefix: bool = False) -> spm.SentencePieceProcessor:
    """A folder shaped like InternVL2-2B's tokenizer files, and its sentencepiece model (vocab 400, BPE,
    byte fallback, identity normalisation). Imported by test_prompts.py."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS * 10), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=add_dummy_prefix, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, user_defined_symbols=_SP_USER_DEFINED,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")}
    decoder |= {str(sp.piece_to_id(t)): _added(t) for t in _SP_USER_DEFINED}
    decoder |= {str(n + k): _added(t) for k, t in enumerate(_IMAGE_TOKENS)}
    decoder[str(n + len(_IMAGE_TOKENS))] = _added(_PLAIN_ADDED, special=False)
    additional = [*_SP_USER_DEFINED, *_IMAGE_TOKENS]
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
                    "additional_special_tokens": additional}), encoding="utf-8")
    # The remote code a transformers loader would import: it must never run.
    (out / "tokenization_internlm2.py").write_text(
        f"open({str(out / 'REMOTE_CODE_RAN')!r}, 'w').close()\nraise RuntimeError('remote code executed')\n"
    )
    return sp


@pytest.fixture(scope="module", params=[False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def internlm2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("internlm2")
    sp = write_internlm2_checkpoint(folder, add_dummy_prefix=request.param)
    return folder, sp, load_tokenizer(folder)


@pytest.fixture(scope="module")
def reference(internlm2):
    """transformers' Python tokenizer machinery over the same sentencepiece model and added tokens."""
    sp_backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    from tokenizers import AddedToken

    folder, _, _ = internlm2
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = {int(k): AddedToken(v["content"], special=v["special"], normalized=False)
               for k, v in config["added_tokens_decoder"].items()}
    return sp_backend.SentencePieceBackend(
        vocab_file=str(folder / "tokenizer.model"), legacy=True, bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", pad_token="</s>", added_tokens_decoder=decoder,
        additional_special_tokens=config["additional_special_tokens"],
    )


def test_internlm2_loads_without_remote_code(internlm2) -> None:
    folder, sp, tok = internlm2
    assert isinstance(tok, InternLM2Tokenizer)
    assert not (folder / "REMOTE_CODE_RAN").exists()
    n = sp.get_piece_size()
    assert tok.vocab_size == n + len(_IMAGE_TOKENS) + 1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert [tok.token_to_id(t) for t in _IMAGE_TOKENS] == list(range(n, n + len(_IMAGE_TOKENS)))
    assert tok.token_to_id("<|im_end|>") == sp.piece_to_id("<|im_end|>")
    assert tok.token_to_id("▁the") == sp.piece_to_id("▁the")
    assert tok.token_to_id("no such token") is None


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_internlm2_plain_text_matches_sentencepiece(internlm2, reference, text: str) -> None:
    _, sp, tok = internlm2
    ids = tok.encode(text)
    assert ids == [1, *sp.encode(text)]
    assert tok.decode(ids) == reference.clean_up_tokenization(sp.decode(sp.encode(text)))


@pytest.mark.parametrize(
    "text",
    [
        "<|im_start|>system\nYou are helpful.<|im_end|><|im_start|>user\n"
        "<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "What colour is the car?<|im_end|><|im_start|>assistant\n",
        "<s>Hello</s> <unk>x",
        " lead <ref>the dog</ref><box>[[1, 2, 3, 4]]</box> trail ",
        "a<|tool|>b <quad></quad>\n\n",
        "<img<IMG_CONTEXT>>< img>",
    ],
)
def test_internlm2_special_tokens_match_transformers(internlm2, reference, text: str) -> None:
    _, _, tok = internlm2
    expected = [1, *reference.convert_tokens_to_ids(reference.tokenize(text))]
    assert tok.encode(text) == expected


def test_internlm2_every_special_token_is_one_id(internlm2) -> None:
    _, _, tok = internlm2
    for token in [*INTERNVL2_SPECIAL_TOKENS, _PLAIN_ADDED]:
        assert tok.encode(token) == [1, tok.token_to_id(token)], token


def test_internlm2_decode_quirks(internlm2) -> None:
    """What InternLM2Tokenizer.decode returns on transformers 4.x (read from its code), hand-written."""
    _, _, tok = internlm2
    hello = tok.encode("Hello world")
    assert tok.decode(hello) == "Hello world"
    assert tok.decode(hello, skip_special_tokens=False) == " <s>Hello world"  # a space before a kept special
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>")
    # The space goes before the text that precedes a kept special token (not before the token itself).
    assert tok.decode(chat, skip_special_tokens=False) == " <s><|im_start|> user\nHi<|im_end|>"
    assert tok.decode(chat) == "user\nHi"
    # Additional specials above the sentencepiece vocabulary decode as separate words.
    image = tok.encode("<img><IMG_CONTEXT></img>\nWhat colour?")
    assert tok.decode(image, skip_special_tokens=False) == " <s> <img> <IMG_CONTEXT> </img> \nWhat colour?"
    assert tok.decode(image) == "\nWhat colour?"
    # A non-special added token survives skip_special_tokens, as a separate word.
    assert tok.decode(tok.encode("a<|tool|>b")) == "a <|tool|> b"
    # transformers' clean_up_tokenization is applied unconditionally by InternLM2Tokenizer.
    assert tok.decode(tok.encode("Hello , world ? It 's")) == "Hello, world? It's"
    assert tok.decode([]) == ""
    assert tok.decode([1, 2]) == ""
    assert tok.decode([*hello, tok.vocab_size, 10**9]) == "Hello world"


def test_internlm2_honours_strip_flags_and_bos_flag(tmp_path: Path) -> None:
    write_internlm2_checkpoint(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    plain = load_tokenizer(tmp_path)
    im_end = plain.token_to_id("<|im_end|>")
    cfg["added_tokens_decoder"][str(im_end)]["rstrip"] = True
    cfg["added_tokens_decoder"][str(im_end)]["lstrip"] = True
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("a  <|im_end|> \n b") == [*plain.encode("a")[1:], im_end, *plain.encode("b")[1:]]


# ---------------------------------------------------------------------------------------------------------
# Loader errors and the transformers fallback


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad_json"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizers library"):
        load_tokenizer(bad)
    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    (bad_cfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_tokenizer(bad_cfg)
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM2Tokenizer"}))
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.model"):
        load_tokenizer(no_model)
    bad_sp = tmp_path / "bad_sp"
    bad_sp.mkdir()
    (bad_sp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM2Tokenizer"}))
    (bad_sp / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="sentencepiece"):
        load_tokenizer(bad_sp)


def test_transformers_fallback(tmp_path: Path, tokenizer_dir: Path, tiny: Tokenizer) -> None:
    """No tokenizer.json, no remote code: a Qwen2-style vocab.json + merges.txt (InternVL2-1B) via AutoTokenizer."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as BackendTokenizer

    BackendTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).model.save(str(tmp_path))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    del config["add_bos_token"]  # Qwen2 adds no BOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert not isinstance(tok, FastTokenizer | InternLM2Tokenizer)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (tiny.vocab_size, tiny.eos_id, tiny.pad_id)
    text = "Hello world<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat?"
    assert tok.encode(text) == tiny.encode(text)[1:]
    assert tok.token_to_id("<IMG_CONTEXT>") == tiny.token_to_id("<IMG_CONTEXT>")
    assert tok.token_to_id("no such token") is None
    assert tok.decode(tok.encode(text)) == "Hello worlduser\n\nWhat?"
    assert tok.decode([*tok.encode(text), 10**9], skip_special_tokens=False) == text


def test_other_remote_code_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({
            "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]},
            "tokenizer_class": "XTokenizer",
        })
    )
    (tmp_path / "tokenization_x.py").write_text(
        f"open({str(tmp_path / 'REMOTE_CODE_RAN')!r}, 'w').close()\n"
    )
    with pytest.raises(ModelLoadError, match="remote code"):
        load_tokenizer(tmp_path)
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


def test_loading_a_slow_tokenizer_prints_no_transformers_notice(tmp_path: Path, ptp_home: Path) -> None:
    """`ptp infer` on a checkpoint whose tokenizer goes through AutoTokenizer (vocab.json + merges.txt, as
    InternVL2-1B ships it): transformers' "You are using a model of type internvl_chat to instantiate ..." is
    not printed (nothing a user can act on), and the logger keeps every other record."""
    import logging
    import shutil

    from PIL import Image
    from test_cli import ptp, records, write_jsonl
    from tokenizers import Tokenizer as BackendTokenizer

    from ptp_cli.builders.tiny import ensure_tiny
    from ptp_cli.text.tokenization import _without_config_type_notice

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny(cache_dir=ptp_home / "models"), model)
    BackendTokenizer.from_file(str(model / "tokenizer.json")).model.save(str(model))
    (model / "tokenizer.json").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    write_jsonl(tmp_path / "in.jsonl", records(1, "img.png"))
    result = ptp("infer", "in.jsonl", "--model", str(model), "--max-new-tokens", "2", "--max-tiles", "1",
                 home=ptp_home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "to instantiate a model of type" not in result.stderr.decode()
    assert all(line.startswith("ptp: ") for line in result.stderr.decode().splitlines()), result.stderr.decode()
    logger = logging.getLogger("transformers.configuration_utils")
    with _without_config_type_notice():
        assert logger.filters and logger.filters[0].filter(logging.makeLogRecord({"msg": "a real warning"}))
    assert not logger.filters
