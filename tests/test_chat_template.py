"""-hf checkpoints are prompted from their own chat template, exactly as transformers prompts them.

A tiny -hf checkpoint carries an InternVL3-hf-style chat template, ``max_patches`` 4 (not 12) and a
``generation_config.json`` with a list of EOS ids. The reference prompt is transformers' own:
``tokenizer.apply_chat_template`` (a sandboxed Jinja render), the image tiled by ``GotOcr2ImageProcessor`` and
expanded by ``InternVLProcessor.replace_image_token``, tokenised without added special tokens, as the
processor does. The reference answer is ``InternVLForConditionalGeneration.generate`` on that prompt.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    GotOcr2ImageProcessor,
    InternVLForConditionalGeneration,
)
from transformers.models.internvl.processing_internvl import InternVLProcessor

from ptp_cli.builders.tiny import TINY_VERSION
from ptp_cli.builders.writers import save_hf_layout
from ptp_cli.chat_template import read_chat_template
from ptp_cli.errors import ModelLoadError
from ptp_cli.loading import load_model, load_state_dict
from ptp_cli.pipeline import Pipeline, RunConfig
from ptp_cli.pruning import PruneConfig
from ptp_cli.records import iter_records

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


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate(SIZES):
        g = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(d / f"{i}.png")
        paths.append(d / f"{i}.png")
    return paths


def reference_ids(hf_dir: Path, image: Path, question: str, system: str | None = None) -> list[int]:
    """transformers' prompt: the chat template rendered, the image expanded by the processor, then tokenised."""
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    patches = GotOcr2ImageProcessor.from_pretrained(hf_dir)(images=[Image.open(image).convert("RGB")])["num_patches"]
    processor = SimpleNamespace(  # the attributes InternVLProcessor.__init__ takes from the tokenizer
        start_image_token=tok.start_image_token, end_image_token=tok.end_image_token,
        image_token=tok.context_image_token, image_seq_length=256,
    )
    expanded = InternVLProcessor.replace_image_token(processor, {"num_patches": list(patches)}, 0)
    return tok(text.replace(tok.context_image_token, expanded), add_special_tokens=False)["input_ids"]


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


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_prompt_ids_are_transformers(hf_dir, images, system):
    pipe = Pipeline.load(RunConfig(model=str(hf_dir), system_message=system))
    for image, question in zip(images, QUESTIONS, strict=True):
        assert prepared(pipe, image, question).ids == reference_ids(hf_dir, image, question, system)
    assert prepared(pipe, images[0], QUESTIONS[0]).num_tiles == 4  # max_patches 4: 3 tiles + thumbnail


def test_greedy_answers_are_transformers(hf_dir, images, tmp_path):
    ref = InternVLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pipe = Pipeline.load(RunConfig(model=str(hf_dir)))

    def generate(image: Path, question: str, eos: list[int]) -> list[int]:
        ids = torch.tensor([reference_ids(hf_dir, image, question)])
        pixels = prepared(pipe, image, question).pixel_values  # ptp's tiling, compared in test_image.py
        config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, do_sample=False,
                                  max_new_tokens=NEW)
        with torch.no_grad():
            out = ref.generate(input_ids=ids, pixel_values=pixels, generation_config=config)
        return out[0, ids.shape[1]:].tolist()

    # Make a token the model emits third an EOS (a list in generation_config.json), so stopping is compared too.
    free = generate(images[0], QUESTIONS[0], [tok.eos_token_id, im_end])
    assert len(free) == NEW
    eos = [tok.eos_token_id, free[2]]
    _write_eos(hf_dir, eos)
    try:
        rows = ptp_rows(hf_dir, images, tmp_path)
    finally:
        (hf_dir / "generation_config.json").unlink()
    for row, image, question in zip(rows, images, QUESTIONS, strict=True):
        expected = generate(image, question, [*eos, im_end])
        got = row["logprobs"]["ids"] + ([expected[-1]] if row["finish_reason"] == "stop" else [])
        assert got == expected
        assert row["settings"]["template"] == "checkpoint"
    assert rows[0]["finish_reason"] == "stop" and len(rows[0]["logprobs"]["ids"]) == 2


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
