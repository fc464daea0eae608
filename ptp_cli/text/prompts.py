"""Prompt templates of the InternVL2 family, and the prompt ids (with index spans) the engine runs on.

The templates follow InternVL's ``conversation.py`` (separator style MPT):
``system_template.format(system_message) + sep + user_role + message + sep + assistant_role``.
The user message is ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>\\n`` + question, as the official ``chat()``
builds it from ``<image>\\n{question}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptp_cli.errors import PromptError, UsageError
from ptp_cli.text.tokenization import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Tokenizer

# InternVL2's system message: the one InternVL's conversation.py gives internlm2-chat, Hermes-2 and phi3-chat
# (InternVL2 checkpoints' chat() copies it from the template into ``model.system_message``).
INTERNVL2_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# InternVL2.5's, from the internvl2_5 template.
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclass(frozen=True)
class Template:
    """A single-turn chat template."""

    name: str  # the name checkpoints use in config.json ("template")
    system_template: str  # formatted with system_message
    system_message: str  # default system message
    user_role: str  # opens the user turn
    assistant_role: str  # opens the assistant turn (the prompt ends with it)
    sep: str  # closes the system and user turns
    stop_tokens: tuple[str, ...]  # tokens that end generation (EOS is added by encode_prompt)

    @property
    def sep_token(self) -> str:
        """The separator as a single token (official chat(): ``convert_tokens_to_ids(sep.strip())``)."""
        return self.sep.strip()


def _chatml(
    name: str, system_message: str, *, sep: str = "<|im_end|>", stop: tuple[str, ...] = ()
) -> Template:
    return Template(
        name=name, system_template="<|im_start|>system\n{system_message}", system_message=system_message,
        user_role="<|im_start|>user\n", assistant_role="<|im_start|>assistant\n", sep=sep,
        stop_tokens=("<|im_end|>", *stop),
    )


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        _chatml("internlm2-chat", INTERNVL2_SYSTEM_MESSAGE),  # InternVL2-2B, -8B
        _chatml("Hermes-2", INTERNVL2_SYSTEM_MESSAGE, stop=("<|endoftext|>",)),  # InternVL2-1B (Qwen2)
        Template(  # InternVL2-4B (Phi-3)
            name="phi3-chat", system_template="<|system|>\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE, user_role="<|user|>\n", assistant_role="<|assistant|>\n",
            sep="<|end|>", stop_tokens=("<|end|>",),
        ),
        _chatml("internvl2_5", INTERNVL2_5_SYSTEM_MESSAGE, sep="<|im_end|>\n"),  # InternVL2.5
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UsageError(f"unknown prompt template {name!r}; valid: {', '.join(TEMPLATES)}") from None


def build_prompt(
    template: Template, *, question: str, num_image_tokens: int, system_message: str | None = None
) -> str:
    """The prompt text for one image (``num_image_tokens`` placeholders) and one question."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
    system = template.system_message if system_message is None else system_message
    message = f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * num_image_tokens}{IMG_END_TOKEN}\n{question}"
    return (
        template.system_template.format(system_message=system) + template.sep
        + template.user_role + message + template.sep
        + template.assistant_role
    )


@dataclass(frozen=True)
class PromptIds:
    """A tokenised prompt and where its parts are."""

    ids: list[int]  # [S] the whole prompt, BOS included when the tokenizer adds one
    image_start: int  # index of the first <IMG_CONTEXT>; they fill ids[image_start : image_start + N]
    num_image_tokens: int  # N, the <IMG_CONTEXT> placeholders (256 per tile)
    instruction_start: int  # the question's tokens are ids[instruction_start:instruction_end]
    instruction_end: int  # the template's separator sits here
    stop_ids: list[int]  # generation ends at any of these (separator token(s), then EOS)


def required_id(tokenizer: Tokenizer, token: str, needed_by: str) -> int:
    """The id of ``token``; ``UsageError`` naming what needs it when the tokenizer lacks it."""
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise UsageError(
            f"the tokenizer has no {token!r} token, which {needed_by} needs; is the template right for this model?"
        )
    return idx


def _is_blank(tokenizer: Tokenizer, idx: int) -> bool:
    return tokenizer.decode([idx], skip_special_tokens=False).strip() == ""


def encode_prompt(
    tokenizer: Tokenizer,
    template: Template,
    *,
    question: str,
    num_image_tokens: int,
    system_message: str | None = None,
) -> PromptIds:
    """Tokenise a named template's prompt and locate the image placeholders and the question (``locate``).

    ``UsageError`` when the tokenizer lacks a token the template needs.
    """
    text = build_prompt(
        template, question=question, num_image_tokens=num_image_tokens, system_message=system_message
    )
    needed_by = f"prompt template {template.name!r}"
    sep = required_id(tokenizer, template.sep_token, needed_by)
    stop_ids: list[int] = []
    for token in template.stop_tokens:
        idx = tokenizer.token_to_id(token)
        if idx is not None and idx not in stop_ids:
            stop_ids.append(idx)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in stop_ids:
        stop_ids.append(tokenizer.eos_id)
    return locate(
        tokenizer, tokenizer.encode(text), num_image_tokens=num_image_tokens, end_of_turn=sep,
        stop_ids=stop_ids, needed_by=needed_by,
    )


def locate(
    tokenizer: Tokenizer,
    ids: list[int],
    *,
    num_image_tokens: int,
    end_of_turn: int,
    stop_ids: list[int],
    needed_by: str,
) -> PromptIds:
    """Find the image placeholders and the question in a tokenised single-turn prompt.

    The question's span starts after ``</img>`` and any whitespace-only tokens (the ``\n``) and ends at the
    last ``end_of_turn`` token (only the assistant role follows it, so a question spelling it is safe).
    Raises ``PromptError`` (a record error, also a ``ValueError``) when the ids hold a number of
    ``<IMG_CONTEXT>`` other than ``num_image_tokens`` (e.g. a question that spells the token), the image block
    is malformed or the question is blank; ``UsageError`` when the tokenizer lacks an image token.
    """
    ctx = required_id(tokenizer, IMG_CONTEXT_TOKEN, needed_by)
    img_start = required_id(tokenizer, IMG_START_TOKEN, needed_by)
    img_end = required_id(tokenizer, IMG_END_TOKEN, needed_by)

    count = ids.count(ctx)
    if count != num_image_tokens:
        raise PromptError(f"prompt has {count} {IMG_CONTEXT_TOKEN} tokens, expected {num_image_tokens}")
    start = ids.index(ctx)
    end = start + num_image_tokens  # index of </img>
    if start == 0 or ids[start - 1] != img_start or end >= len(ids) or ids[end] != img_end:
        raise PromptError(
            f"the {IMG_CONTEXT_TOKEN} tokens are not one block between {IMG_START_TOKEN} and {IMG_END_TOKEN}"
        )
    if end_of_turn not in ids[end:]:
        raise PromptError("the prompt has no end-of-turn token after the image")
    instruction_end = len(ids) - 1 - ids[::-1].index(end_of_turn)
    instruction_start = end + 1
    while instruction_start < instruction_end and _is_blank(tokenizer, ids[instruction_start]):
        instruction_start += 1
    if instruction_start >= instruction_end:
        raise PromptError("the question has no tokens")
    return PromptIds(
        ids=ids, image_start=start, num_image_tokens=num_image_tokens,
        instruction_start=instruction_start, instruction_end=instruction_end, stop_ids=stop_ids,
    )
