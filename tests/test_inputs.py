"""The input processor (record -> tiles -> prompt ids -> spans -> Request) and device/dtype resolution."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from ptp_cli.builders.tiny import TINY_VERSION
from ptp_cli.errors import ImageError, PromptTooLongError, RecordError, UsageError
from ptp_cli.io.records import Record
from ptp_cli.loading import load_config
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.preprocess.inputs import InputProcessor, RequestDefaults
from ptp_cli.run.devices import is_out_of_memory, resolve_device, resolve_dtype
from ptp_cli.text.chat_template import NamedPrompter
from ptp_cli.text.prompts import PromptIds, get_template
from ptp_cli.text.tokenization import IMG_CONTEXT_TOKEN, load_tokenizer

QUESTION = "What colour is the sky?"


@pytest.fixture(scope="module")
def tiny(ptp_home: Path):
    path = ptp_home / "models" / TINY_VERSION
    return load_tokenizer(path), load_config(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "wide.png"
    Image.new("RGB", (1400, 460), (20, 120, 220)).save(path)
    return path


def processor(tiny, **kw) -> InputProcessor:
    tok, cfg = tiny
    return InputProcessor(encoder=NamedPrompter(tok, get_template(cfg.template), cfg.system_message), tiling=TilingOptions.from_config(cfg, max_tiles=6),
                          tokens_per_tile=cfg.tokens_per_tile, **kw)


def test_a_record_becomes_a_request(tiny, image: Path) -> None:
    tok, cfg = tiny
    defaults = RequestDefaults(max_new_tokens=7, temperature=0.5, seed=3)
    req = processor(tiny, defaults=defaults, pixel_dtype=torch.bfloat16).process(
        Record(line=1, id="a", image=image, question=QUESTION))
    tiles = TilingOptions.from_config(cfg, max_tiles=6).num_tiles(1400, 460)
    assert tiles > 1 and req.num_tiles == tiles and req.has_thumbnail
    assert req.pixel_values.shape == (tiles, 3, 448, 448) and req.pixel_values.dtype == torch.bfloat16
    n = tiles * cfg.tokens_per_tile
    ctx = tok.token_to_id(IMG_CONTEXT_TOKEN)
    assert req.ids[req.image_start : req.image_start + n] == [ctx] * n and req.ids.count(ctx) == n
    q0, q1 = req.instruction
    assert tok.decode(req.ids[q0:q1]).strip() == QUESTION
    assert tok.eos_id in req.stop_ids
    assert (req.max_new_tokens, req.temperature, req.seed, req.ignore_eos) == (7, 0.5, 3, False)


def test_record_overrides_win_over_the_defaults(tiny, image: Path) -> None:
    overrides = {"max_tiles": 1, "max_new_tokens": 2, "temperature": 0.0, "seed": 9}
    req = processor(tiny, defaults=RequestDefaults(temperature=1.0)).process(
        Record(line=1, id="a", image=image, question=QUESTION, overrides=overrides))
    assert req.num_tiles == 1 and not req.has_thumbnail
    assert (req.max_new_tokens, req.temperature, req.seed) == (2, 0.0, 9)


@pytest.mark.parametrize(
    ("question", "overrides", "kind"),
    [(f"What is {IMG_CONTEXT_TOKEN}?", {}, "prompt_error"), (QUESTION, {"min_tiles": 5, "max_tiles": 2}, "invalid_record")],
)
def test_bad_records_raise_record_errors(tiny, image: Path, question: str, overrides: dict, kind: str) -> None:
    with pytest.raises(RecordError) as err:
        processor(tiny).process(Record(line=1, id="a", image=image, question=question, overrides=overrides))
    assert err.value.kind == kind


def test_a_missing_image_is_an_image_error(tiny, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        processor(tiny).process(Record(line=1, id="a", image=tmp_path / "none.png", question=QUESTION))


class FixedEncoder:
    """Another prompt encoder: fixed ids around the placeholders; remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    name = "fixed"

    def encode(self, *, question: str, num_image_tokens: int) -> PromptIds:
        self.calls.append((question, num_image_tokens))
        ids = [1, 2, *[5] * num_image_tokens, 3, 7, 7, 7, 4]
        return PromptIds(ids=ids, image_start=2, num_image_tokens=num_image_tokens,
                         instruction_start=num_image_tokens + 3, instruction_end=num_image_tokens + 6, stop_ids=[4])


def test_the_prompt_step_is_a_drop_in_encoder(tiny, image: Path) -> None:
    _, cfg = tiny
    encoder = FixedEncoder()
    proc = InputProcessor(encoder=encoder, tiling=TilingOptions.from_config(cfg, max_tiles=1),
                          tokens_per_tile=cfg.tokens_per_tile)
    req = proc.process(Record(line=1, id="a", image=image, question=QUESTION))
    assert encoder.calls == [(QUESTION, 256)]
    assert (req.image_start, req.instruction, list(req.stop_ids)) == (2, (259, 262), [4])
    assert len(req.ids) == 256 + 7


# ---------------------------------------------------------------------------------------------------------
# Devices and dtypes


def test_device_and_dtype_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(("call", "option"), [
    (lambda: resolve_device("tpu"), "--device"), (lambda: resolve_device("gpu:x"), "--device"),
    (lambda: resolve_dtype("int8", torch.device("cpu")), "--dtype"),
])
def test_bad_names_are_one_line_usage_errors(call, option: str) -> None:
    with pytest.raises(UsageError, match=option) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")


def test_a_prompt_longer_than_the_model_takes_is_the_records_error(tiny, image: Path) -> None:
    """prompt_too_long before any compute, with the numbers: the user's cap, then the model's positions (which
    the generated tokens need too); a prompt that just fits passes both."""
    fits = processor(tiny).process(Record(line=1, id="a", image=image, question=QUESTION))
    n = len(fits.ids)
    rec = Record(line=1, id="a", image=image, question=QUESTION, overrides={"max_new_tokens": 5})
    processor(tiny, max_prompt_tokens=n, max_positions=n + 5).process(rec)
    with pytest.raises(PromptTooLongError, match=f"the prompt has {n} tokens .*more than --max-prompt-tokens {n - 1}") as e:
        processor(tiny, max_prompt_tokens=n - 1).process(rec)
    assert e.value.kind == "prompt_too_long" and e.value.details["prompt_tokens"] == n
    assert e.value.details["limit"] == n - 1
    with pytest.raises(PromptTooLongError, match=f"with max_new_tokens 5 it needs {n + 5} positions, more than the model's {n + 4}"):
        processor(tiny, max_positions=n + 4).process(rec)


def test_context_length_stretches_only_under_dynamic_ntk(tiny) -> None:
    _, cfg = tiny
    llm = cfg.llm
    assert replace(llm, rope_scaling=None).context_length == llm.max_position_embeddings
    assert replace(llm, rope_scaling={"type": "dynamic", "factor": 2.0}).context_length == 2 * llm.max_position_embeddings
    assert replace(llm, rope_scaling={"rope_type": "linear", "factor": 4.0}).context_length == llm.max_position_embeddings


@pytest.mark.parametrize(("error", "oom"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 26650080000 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB)"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x5 and 6x7)"), False),
    (ValueError("out of memory"), False),  # only the errors allocators raise
])
def test_out_of_memory_is_recognised_on_every_device(error: BaseException, oom: bool) -> None:
    assert is_out_of_memory(error) is oom
