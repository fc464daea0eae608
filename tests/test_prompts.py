"""Prompt templates and prompt ids: strings against hand-written ones, spans against decoding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_cli.builders.bpe import build_tiny_tokenizer
from ptp_cli.errors import UsageError
from ptp_cli.text.prompts import TEMPLATES, PromptIds, Template, build_prompt, encode_prompt, get_template
from ptp_cli.text.tokenization import Tokenizer, load_tokenizer

SYS_V2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
IMG2 = "<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"

EXPECTED = {
    "internlm2-chat": (
        f"<|im_start|>system\n{SYS_V2}<|im_end|><|im_start|>user\n{IMG2}Q?<|im_end|><|im_start|>assistant\n"
    ),
    "Hermes-2": (
        f"<|im_start|>system\n{SYS_V2}<|im_end|><|im_start|>user\n{IMG2}Q?<|im_end|><|im_start|>assistant\n"
    ),
    "phi3-chat": f"<|system|>\n{SYS_V2}<|end|><|user|>\n{IMG2}Q?<|end|><|assistant|>\n",
    "internvl2_5": (
        f"<|im_start|>system\n{SYS_V25}<|im_end|>\n<|im_start|>user\n{IMG2}Q?<|im_end|>\n<|im_start|>assistant\n"
    ),
}

# Role and separator tokens of all templates, so one tiny tokenizer serves every template.
EXTRA_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tiny_all")
    build_tiny_tokenizer(out, extra_special_tokens=EXTRA_TOKENS)
    return load_tokenizer(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_tokenizer(out)
    return load_tokenizer(out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prompt_strings(name: str) -> None:
    assert build_prompt(get_template(name), question="Q?", num_image_tokens=2) == EXPECTED[name]


def test_templates_are_the_four_known() -> None:
    assert set(TEMPLATES) == set(EXPECTED)
    assert all(isinstance(t, Template) for t in TEMPLATES.values())
    with pytest.raises(AttributeError):
        TEMPLATES["internlm2-chat"].sep = "x"  # type: ignore[misc]


def test_system_message_override() -> None:
    t = get_template("internlm2-chat")
    assert build_prompt(t, question="Q?", num_image_tokens=2, system_message="Be brief.") == (
        f"<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n{IMG2}Q?<|im_end|><|im_start|>assistant\n"
    )
    assert build_prompt(t, question="Q?", num_image_tokens=2, system_message="").startswith(
        "<|im_start|>system\n<|im_end|><|im_start|>user\n"
    )


def test_unknown_template_lists_valid_names() -> None:
    with pytest.raises(UsageError) as err:
        get_template("llama3-chat")
    for name in EXPECTED:
        assert name in str(err.value)


def test_num_image_tokens_must_be_positive(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        build_prompt(get_template("internlm2-chat"), question="Q?", num_image_tokens=0)


def _check_layout(tok: Tokenizer, p: PromptIds, n: int) -> None:
    ctx, start = tok.token_to_id("<IMG_CONTEXT>"), p.image_start
    assert p.num_image_tokens == n
    assert p.ids[start - 1] == tok.token_to_id("<img>")
    assert p.ids[start : start + n] == [ctx] * n
    assert p.ids[start + n] == tok.token_to_id("</img>")
    assert p.ids.count(ctx) == n
    assert start + n < p.instruction_start < p.instruction_end < len(p.ids)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_encode_prompt_spans(tok: Tokenizer, name: str) -> None:
    template = get_template(name)
    question = "What colour is the car on the left?"
    p = encode_prompt(tok, template, question=question, num_image_tokens=7)
    _check_layout(tok, p, 7)
    assert p.ids[0] == tok.bos_id
    assert p.ids == tok.encode(build_prompt(template, question=question, num_image_tokens=7))
    assert tok.decode(p.ids[p.instruction_start : p.instruction_end]) == question
    assert p.ids[p.instruction_start - 1] == tok.encode("\n")[-1]  # the newline after </img> is left out
    assert p.ids[p.instruction_end] == tok.token_to_id(template.sep_token)
    assert tok.decode(p.ids[p.instruction_end + 1 :], skip_special_tokens=False) == (
        template.sep[len(template.sep_token) :] + template.assistant_role
    )


def test_stop_ids(tok: Tokenizer) -> None:
    def stops(name: str) -> list[int]:
        return encode_prompt(tok, get_template(name), question="Q?", num_image_tokens=1).stop_ids

    ids = tok.token_to_id
    assert stops("internlm2-chat") == [ids("<|im_end|>"), tok.eos_id]
    assert stops("internvl2_5") == [ids("<|im_end|>"), tok.eos_id]
    assert stops("Hermes-2") == [ids("<|im_end|>"), ids("<|endoftext|>"), tok.eos_id]
    assert stops("phi3-chat") == [ids("<|end|>"), tok.eos_id]


def test_hermes_without_endoftext_token(tiny: Tokenizer) -> None:
    p = encode_prompt(tiny, get_template("Hermes-2"), question="Q?", num_image_tokens=1)
    assert p.stop_ids == [tiny.token_to_id("<|im_end|>"), tiny.eos_id]


def test_template_tokens_missing_from_tokenizer(tiny: Tokenizer) -> None:
    with pytest.raises(UsageError, match=r"<\|end\|>"):
        encode_prompt(tiny, get_template("phi3-chat"), question="Q?", num_image_tokens=1)


@settings(max_examples=60, deadline=None)
@given(
    question=st.text(
        alphabet=st.characters(whitelist_categories=("L", "N", "P", "S", "Zs"), blacklist_characters="<>")
        | st.sampled_from("\n "),
        min_size=1, max_size=30,
    ).filter(lambda q: not q[0].isspace()),
    n=st.integers(1, 300),
)
def test_span_decodes_to_question(tiny: Tokenizer, question: str, n: int) -> None:
    p = encode_prompt(tiny, get_template("internlm2-chat"), question=question, num_image_tokens=n)
    _check_layout(tiny, p, n)
    assert tiny.decode(p.ids[p.instruction_start : p.instruction_end]) == question


def test_internlm2_tokenizer_spans(tmp_path: Path) -> None:
    from test_tokenization import write_internlm2_checkpoint

    for dummy_prefix in (False, True):
        folder = tmp_path / str(dummy_prefix)
        write_internlm2_checkpoint(folder, add_dummy_prefix=dummy_prefix)
        sp_tok = load_tokenizer(folder)
        question = "How many people are standing near the bus?"
        p = encode_prompt(sp_tok, get_template("internlm2-chat"), question=question, num_image_tokens=256)
        _check_layout(sp_tok, p, 256)
        assert p.ids[0] == 1
        assert sp_tok.decode(p.ids[p.instruction_start : p.instruction_end]) == question
        assert p.stop_ids == [sp_tok.token_to_id("<|im_end|>"), 2]


def test_question_with_separator_keeps_the_real_one(tiny: Tokenizer) -> None:
    question = "Is <|im_end|> a token?"
    p = encode_prompt(tiny, get_template("internlm2-chat"), question=question, num_image_tokens=3)
    assert tiny.decode(p.ids[p.instruction_start : p.instruction_end], skip_special_tokens=False) == question


def test_blank_question_is_an_empty_span_error(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="question"):
        encode_prompt(tiny, get_template("internlm2-chat"), question=" \n ", num_image_tokens=3)


class _DropOne:
    """A tokenizer that loses one <IMG_CONTEXT> id: what a bad tokenizer or truncation would do."""

    def __init__(self, inner: Tokenizer) -> None:
        self._inner = inner
        self.bos_id, self.eos_id = inner.bos_id, inner.eos_id
        self.pad_id, self.vocab_size = inner.pad_id, inner.vocab_size

    def encode(self, text: str) -> list[int]:
        ids = self._inner.encode(text)
        ids.remove(self._inner.token_to_id("<IMG_CONTEXT>"))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)


def test_image_token_count_is_checked(tiny: Tokenizer) -> None:
    t = get_template("internlm2-chat")
    with pytest.raises(ValueError, match="4 <IMG_CONTEXT> tokens, expected 5"):
        encode_prompt(_DropOne(tiny), t, question="Q?", num_image_tokens=5)
    with pytest.raises(ValueError, match="6 <IMG_CONTEXT> tokens, expected 5"):
        encode_prompt(tiny, t, question="What is <IMG_CONTEXT>?", num_image_tokens=5)
