"""-hf checkpoints are prompted from their own chat template, exactly as transformers prompts them.

A tiny -hf checkpoint carries an InternVL3-hf-style chat template, ``max_patches`` 4 (not 12) and a
``generation_config.json`` with a list of EOS ids. The reference prompt and pixels are transformers' own:
``InternVLProcessor.apply_chat_template(..., tokenize=True)``, which renders the template, tiles and expands
the image and tokenises with the tokenizer's special tokens unless the text starts with its BOS. Three
tokenizer set-ups: the tiny tokenizer as shipped (adds ``<s>``), a Qwen2-style one (adds nothing, no BOS), and
the tiny one under a template that spells ``{{ bos_token }}`` itself. The reference answer is
``InternVLForConditionalGeneration.generate`` on the processor's output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BatchFeature,
    GenerationConfig,
    GotOcr2ImageProcessor,
    InternVLForConditionalGeneration,
)
from transformers.models.internvl.processing_internvl import InternVLProcessor

from ptp_cli.builders.tiny import TINY_VERSION
from ptp_cli.builders.writers import save_hf_layout
from ptp_cli.errors import ModelLoadError
from ptp_cli.io.records import iter_records
from ptp_cli.loading import load_model, load_state_dict
from ptp_cli.pruning import PruneConfig
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.text.chat_template import read_chat_template
from ptp_cli.text.tokenization import load_tokenizer

# Written for this test after InternVL3-hf's template: ChatML turns, an image becomes "<IMG_CONTEXT>\n".
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
KINDS = ["adds-bos", "no-bos", "bos-in-template"]
NEW = 6
QUESTIONS = ["Read the sign, please.", "What is in the picture?"]
SIZES = [(1300, 500), (448, 448)]  # 3 tiles + thumbnail at max_patches 4 (10 + 1 at 12); one tile


def _hf_checkpoint(tiny: Path, out: Path, *, template: bool = True, max_patches: int = 4) -> Path:
    ours = load_model(str(tiny))
    cfg = dataclasses.replace(ours.cfg, max_dynamic_patch=max_patches)
    save_hf_layout(load_state_dict(tiny, ours.cfg), cfg, out, tokenizer_dir=tiny)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = {  # what InternVLProcessor reads off the tokenizer
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if template:
        (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


def _write_eos(hf_dir: Path, eos: list[int]) -> None:
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 1}))


@pytest.fixture(scope="module")
def hf_dir(ptp_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hf_checkpoint(ptp_home / "models" / TINY_VERSION, tmp_path_factory.mktemp("tiny_hf"))


def _qwen2_style(hf_dir: Path) -> None:
    """Make the tiny tokenizer add nothing and have no BOS, as Qwen2's."""
    backend = json.loads((hf_dir / "tokenizer.json").read_text())
    backend["post_processor"] = None
    (hf_dir / "tokenizer.json").write_text(json.dumps(backend))
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, bos_token=None)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(
    request: pytest.FixtureRequest, hf_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """(kind, a copy of the -hf checkpoint with that tokenizer set-up)."""
    kind: str = request.param
    out = tmp_path_factory.mktemp(kind)
    shutil.copytree(hf_dir, out, dirs_exist_ok=True)
    if kind == "no-bos":
        _qwen2_style(out)
    elif kind == "bos-in-template":
        (out / "chat_template.jinja").write_text("{{ bos_token }}" + TEMPLATE)
    return kind, out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(d / f"{i}.png")
        paths.append(d / f"{i}.png")
    return paths


class ImageOnlyProcessor(InternVLProcessor):
    """transformers' ``InternVLProcessor`` without a video processor: transformers builds none without
    torchvision (not installed here), so ``AutoProcessor`` cannot load the checkpoint. The rest is its own."""

    def __init__(self, image_processor: Any, tokenizer: Any, image_seq_length: int, chat_template: str) -> None:
        # ProcessorMixin takes its sub-processors from this signature, so it ignores the None video processor.
        super().__init__(
            image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template
        )


def reference(model_dir: Path, image: Path, question: str, system: str | None = None) -> BatchFeature:
    """transformers' prompt ids and pixels: the processor's ``apply_chat_template`` with the image, tokenised."""
    processor = ImageOnlyProcessor(
        GotOcr2ImageProcessor.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
        image_seq_length=json.loads((model_dir / "config.json").read_text())["image_seq_length"],
        chat_template=(model_dir / "chat_template.jinja").read_text(),
    )
    content = [{"type": "image", "image": Image.open(image).convert("RGB")}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def ptp_rows(model: Path, images: list[Path], tmp_path: Path, **kw) -> list[dict]:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps({"image": str(i), "question": q}) + b"\n"
                             for i, q in zip(images, QUESTIONS, strict=True)))
    config = RunConfig(model=str(model), max_new_tokens=NEW, logprobs=True, prune=PruneConfig(method="none"), **kw)
    return list(Pipeline.load(config).infer(iter_records(src)))


def prepared(pipe: Pipeline, image: Path, question: str):
    """ptp's request for one record (prompt ids, tiles)."""
    src = image.parent / "one.jsonl"
    src.write_bytes(orjson.dumps({"image": str(image), "question": question}) + b"\n")
    (record,) = iter_records(src)
    return pipe.prepare(record).request


def test_tokenizers_add_what_transformers_adds(checkpoint):
    kind, model_dir = checkpoint
    ours, theirs = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for text in ("", "Read the sign, please."):
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert (ours.bos_id is None, theirs.bos_token is None, ours.encode("")) == (
        (True, True, []) if kind == "no-bos" else (False, False, [theirs.convert_tokens_to_ids("<s>")])
    )


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_prompt_ids_are_transformers(checkpoint, images, system):
    kind, model_dir = checkpoint
    pipe = Pipeline.load(RunConfig(model=str(model_dir), system_message=system))
    for image, question in zip(images, QUESTIONS, strict=True):
        expected = reference(model_dir, image, question, system)["input_ids"][0].tolist()
        assert prepared(pipe, image, question).ids == expected
    ids = prepared(pipe, images[0], QUESTIONS[0]).ids
    tok = AutoTokenizer.from_pretrained(model_dir)
    # One BOS, whether the tokenizer or the template puts it there; none from a Qwen2-style tokenizer.
    bos = tok.convert_tokens_to_ids("<s>")
    assert ids[: ids.index(tok.convert_tokens_to_ids("<|im_start|>"))] == ([] if kind == "no-bos" else [bos])
    assert prepared(pipe, images[0], QUESTIONS[0]).num_tiles == 4  # max_patches 4: 3 tiles + thumbnail


def test_greedy_answers_are_transformers(checkpoint, images, tmp_path):
    _, model_dir = checkpoint
    ref = InternVLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def generate(image: Path, question: str, eos: list[int]) -> tuple[list[int], list[float]]:
        """transformers' greedy answer ids and their log-probabilities."""
        inputs = reference(model_dir, image, question)  # input_ids, attention_mask, pixel_values
        config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, do_sample=False,
                                  max_new_tokens=NEW, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = ref.generate(**inputs, generation_config=config)
        ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        return ids, [torch.log_softmax(s[0], -1)[i].item() for s, i in zip(out.scores, ids, strict=True)]

    # Make a token the model emits mid-answer (the first one unlike those before it) an EOS (a list in
    # generation_config.json), so stopping is compared too.
    free, _ = generate(images[0], QUESTIONS[0], [tok.eos_token_id, im_end])
    assert len(free) == NEW
    stop_at = next((k for k in range(1, NEW) if free[k] not in free[:k]), 0)  # 0: it repeats one token
    eos = [tok.eos_token_id, free[stop_at]]
    _write_eos(model_dir, eos)
    try:
        rows = ptp_rows(model_dir, images, tmp_path)
    finally:
        (model_dir / "generation_config.json").unlink()
    for row, image, question in zip(rows, images, QUESTIONS, strict=True):
        expected, logprobs = generate(image, question, [*eos, im_end])
        got = row["logprobs"]["ids"] + ([expected[-1]] if row["finish_reason"] == "stop" else [])
        assert got == expected
        # The tiny model's greedy picks barely depend on a leading BOS; its log-probabilities do (1e-3 and up).
        values = row["logprobs"]["values"]
        torch.testing.assert_close(torch.tensor(values), torch.tensor(logprobs[: len(values)]), rtol=0, atol=1e-4)
        assert row["settings"]["template"] == "checkpoint"
    assert rows[0]["finish_reason"] == "stop" and len(rows[0]["logprobs"]["ids"]) == stop_at


def test_fallback_and_original_layout_name_their_template(ptp_home, hf_dir, images, tmp_path):
    bare = _hf_checkpoint(ptp_home / "models" / TINY_VERSION, tmp_path / "bare", template=False)
    assert read_chat_template(bare) is None
    assert {r["settings"]["template"] for r in ptp_rows(bare, images, tmp_path)} == {"internvl2_5"}
    tiny = ptp_home / "models" / TINY_VERSION
    assert read_chat_template(tiny) is None
    assert {r["settings"]["template"] for r in ptp_rows(tiny, images, tmp_path)} == {"internlm2-chat"}


def test_template_sources_in_transformers_order(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "from tokenizer_config"}]}))
    assert read_chat_template(tmp_path) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert read_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("from chat_template.jinja")
    assert read_chat_template(tmp_path) == "from chat_template.jinja"


def test_a_template_without_the_image_token_fails_at_load(ptp_home, tmp_path):
    bad = _hf_checkpoint(ptp_home / "models" / TINY_VERSION, tmp_path / "bad", template=False)
    (bad / "chat_template.jinja").write_text(TEMPLATE.replace("<IMG_CONTEXT>", "<image>"))
    with pytest.raises(ModelLoadError, match=r"'checkpoint' does not fit this checkpoint.*has 0 <IMG_CONTEXT>"):
        Pipeline.load(RunConfig(model=str(bad)))
    (bad / "chat_template.jinja").write_text("{{ raise_exception('no images, please') }}")
    with pytest.raises(ModelLoadError, match="no images, please"):
        Pipeline.load(RunConfig(model=str(bad)))
