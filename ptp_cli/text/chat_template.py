"""Prompts of transformers-layout (-hf) checkpoints, rendered from the checkpoint's own chat template.

An ``InternVLForConditionalGeneration`` checkpoint ships a Jinja chat template (``chat_template.jinja``, the
legacy ``chat_template.json``, or ``chat_template`` in ``tokenizer_config.json``, in that order of
precedence) and a ``generation_config.json``. transformers builds a prompt by rendering the template in a
sandbox over ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]`` (the
image becomes ``<IMG_CONTEXT>``), then ``InternVLProcessor`` expands each ``<IMG_CONTEXT>`` into ``<img>`` +
256 x tiles ``<IMG_CONTEXT>`` + ``</img>``, and the processor tokenises the text with the tokenizer's special
tokens (a BOS for Llama/InternLM2-style tokenizers, none for Qwen2-style ones) unless it already starts with
the BOS string (the template spelled it). ``CheckpointPrompter`` does the same; ``prompter_for`` picks it, or
the named template of ``prompts.py`` for original-layout checkpoints and for -hf checkpoints that carry none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ptp_cli.config import ModelConfig
from ptp_cli.errors import ModelLoadError, PromptError
from ptp_cli.text.prompts import PromptIds, Template, encode_prompt, get_template, locate
from ptp_cli.text.tokenization import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, Tokenizer

CHECKPOINT = "checkpoint"  # the template name echoed in row settings when the checkpoint's own is used
_SENTINEL = "\x00ptp-answer\x00"  # an assistant message whose end shows the template's end-of-turn token


class Prompter(Protocol):
    """Turns a question and an image's placeholder count into prompt ids with their spans."""

    name: str  # echoed in row settings as "template"

    def encode(self, *, question: str, num_image_tokens: int) -> PromptIds: ...


@dataclass(frozen=True)
class NamedPrompter:
    """A built-in template of ``prompts.py`` (original-layout checkpoints; -hf ones without a template)."""

    tokenizer: Tokenizer
    template: Template
    system_message: str | None  # None: the template's default

    @property
    def name(self) -> str:
        return self.template.name

    def encode(self, *, question: str, num_image_tokens: int) -> PromptIds:
        return encode_prompt(
            self.tokenizer, self.template, question=question, num_image_tokens=num_image_tokens,
            system_message=self.system_message,
        )


def read_chat_template(model_dir: Path) -> str | None:
    """The checkpoint's chat template source, or None when it carries none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _json(model_dir / name)
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):  # named templates, as transformers saves several: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _is_hf_layout(model_dir: Path) -> bool:
    raw = _json(model_dir / "config.json")
    if not isinstance(raw, dict):
        return False
    return raw.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in (raw.get("architectures") or [])


def _eos_ids(model_dir: Path, tokenizer: Tokenizer) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list); the tokenizer's EOS without one."""
    config = _json(model_dir / "generation_config.json")
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    if eos is None:
        eos = tokenizer.eos_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def _added_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids encode() puts before and after any text (BOS, EOS), told apart by a one-letter probe."""
    empty, probe = tokenizer.encode(""), tokenizer.encode("a")
    n = 0
    while n < min(len(empty), len(probe)) and empty[n] == probe[n]:
        n += 1
    return empty[:n], empty[n:]


def _compile(source: str) -> Any:
    """The template compiled as transformers does: an immutable sandbox, trimmed blocks, loop controls."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ModelLoadError(f"the checkpoint's chat template does not compile: {e}") from e


class CheckpointPrompter:
    """Prompts rendered from a -hf checkpoint's own chat template, expanded as ``InternVLProcessor`` does."""

    name = CHECKPOINT

    def __init__(
        self, source: str, tokenizer: Tokenizer, *, eos_ids: list[int], system_message: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.system_message = system_message  # only the user's: the template decides whether there is one
        self._template = _compile(source)
        # Special tokens the template may spell ({{ bos_token }}), as transformers passes them.
        self._tokens = {
            key: tokenizer.decode([idx], skip_special_tokens=False)
            for key, idx in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
            if idx is not None
        }
        self._prefix, self._suffix = _added_ids(tokenizer)  # stripped off fragments such as the end of a turn
        self.end_of_turn = self._end_of_turn()
        self.stop_ids = list(dict.fromkeys([self.end_of_turn, *eos_ids]))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._tokens
            )
        except TemplateError as e:
            raise PromptError(f"the checkpoint's chat template refused the prompt: {e}") from e

    def messages(self, question: str) -> list[dict[str, Any]]:
        """The conversation transformers users write: an optional system turn, then image + question."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        if self.system_message is None:
            return [user]
        return [{"role": "system", "content": [{"type": "text", "text": self.system_message}]}, user]

    def _encode_fragment(self, text: str) -> list[int]:
        """Tokenise without what encode() adds around text (transformers' ``add_special_tokens=False``)."""
        ids = self.tokenizer.encode(text)
        if self._prefix and ids[: len(self._prefix)] == self._prefix:
            ids = ids[len(self._prefix):]
        if self._suffix and ids[-len(self._suffix):] == self._suffix:
            ids = ids[: -len(self._suffix)]
        return ids

    def _encode_prompt(self, text: str) -> list[int]:
        """Tokenise a rendered prompt as ``ProcessorMixin.apply_chat_template`` does: with the tokenizer's
        special tokens, unless the text starts with its BOS string (the template spelled the BOS itself)."""
        bos = self._tokens.get("bos_token")
        if bos and text.startswith(bos):
            return self._encode_fragment(text)
        return self.tokenizer.encode(text)

    def _end_of_turn(self) -> int:
        """The token the template closes an assistant turn with (``<|im_end|>`` for ChatML)."""
        conversation = [*self.messages("?"), {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}]
        try:
            text = self.render(conversation, add_generation_prompt=False)
        except PromptError as e:
            raise ModelLoadError(str(e)) from None
        tail = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
        ids = self._encode_fragment(tail)  # a piece of a prompt: nothing added around it
        first = self.tokenizer.decode(ids[:1], skip_special_tokens=False) if ids else ""
        if not first.strip() or not tail.startswith(first):
            raise ModelLoadError("cannot find the end-of-turn token of the checkpoint's chat template")
        return ids[0]

    def encode(self, *, question: str, num_image_tokens: int) -> PromptIds:
        text = self.render(self.messages(question), add_generation_prompt=True)
        if text.count(IMG_CONTEXT_TOKEN) != 1:
            raise PromptError(f"the rendered prompt has {text.count(IMG_CONTEXT_TOKEN)} {IMG_CONTEXT_TOKEN}, expected 1")
        # One image: its placeholder count (256 x tiles) is the whole expansion.
        text = text.replace(IMG_CONTEXT_TOKEN, f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * num_image_tokens}{IMG_END_TOKEN}")
        return locate(
            self.tokenizer, self._encode_prompt(text), num_image_tokens=num_image_tokens,
            end_of_turn=self.end_of_turn, stop_ids=self.stop_ids, needed_by="the checkpoint's chat template",
        )


def _checkpoint_template(model_dir: Path) -> str | None:
    """The chat template a -hf checkpoint carries (None for the original layout or none shipped)."""
    return read_chat_template(model_dir) if _is_hf_layout(model_dir) else None


def template_name(model_dir: Path, cfg: ModelConfig) -> str:
    """The name ``prompter_for`` will echo as "template", from the checkpoint's files alone (no tokenizer)."""
    return CHECKPOINT if _checkpoint_template(Path(model_dir)) is not None else get_template(cfg.template).name


def prompter_for(
    model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer, *, system_message: str | None
) -> Prompter:
    """The checkpoint's own template for a -hf checkpoint that carries one, else the config's named template.

    ``system_message`` is the user's (``--system-message``); the named templates fall back to the
    checkpoint's, then the template's default.
    """
    source = _checkpoint_template(Path(model_dir))
    if source is not None:
        return CheckpointPrompter(
            source, tokenizer, eos_ids=_eos_ids(model_dir, tokenizer), system_message=system_message
        )
    return NamedPrompter(tokenizer, get_template(cfg.template), system_message or cfg.system_message)
