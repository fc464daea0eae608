"""End to end: ptp's batched greedy generation against transformers' InternVLForConditionalGeneration.generate.

The built-in tiny model is written in the -hf layout and loaded by transformers; both sides get the same
prompt ids (tokenised by ptp) and the same pixel values (tiled by ptp), and must produce the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration

from ptp_cli.builders.tiny import ensure_tiny
from ptp_cli.builders.writers import save_hf_layout
from ptp_cli.loading import load_model, load_state_dict
from ptp_cli.preprocess.image import TilingOptions
from ptp_cli.run.engine import Engine, Request
from ptp_cli.text.prompts import encode_prompt, get_template

NEW = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    tiny = ensure_tiny(cache_dir=tmp_path_factory.mktemp("ptp_home"))
    ours = load_model(str(tiny))
    hf_dir = tmp_path_factory.mktemp("tiny_hf")
    save_hf_layout(load_state_dict(tiny, ours.cfg), ours.cfg, hf_dir, tokenizer_dir=tiny)
    ref = InternVLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    ref.config.image_token_id = ours.image_token_id
    return ours, ref


def make_request(ours, size: tuple[int, int], question: str, max_tiles: int) -> Request:
    g = torch.Generator().manual_seed(size[0] * size[1])
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    pixels = TilingOptions(max_tiles=max_tiles).preprocess(Image.fromarray(arr))
    prompt = encode_prompt(ours.tokenizer, get_template(ours.cfg.template), question=question,
                           num_image_tokens=pixels.shape[0] * ours.cfg.tokens_per_tile)
    return Request(ids=prompt.ids, pixel_values=pixels, image_start=prompt.image_start,
                   instruction=(prompt.instruction_start, prompt.instruction_end), stop_ids=prompt.stop_ids,
                   max_new_tokens=NEW, ignore_eos=True)


def hf_generate(ref, reqs: list[Request], pad_id: int) -> list[list[int]]:
    width = max(len(r.ids) for r in reqs)
    ids = torch.full((len(reqs), width), pad_id)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, r in enumerate(reqs):  # left padding, as for any batched decoder-only generate
        ids[i, width - len(r.ids):] = torch.tensor(r.ids)
        mask[i, width - len(r.ids):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([r.pixel_values for r in reqs]),
                           max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=pad_id)
    return out[:, width:].tolist()


def test_greedy_generation_matches_transformers_single_and_batched(models):
    ours, ref = models
    reqs = [make_request(ours, (448, 448), "What is in the picture?", 6),
            make_request(ours, (1300, 500), "Read the sign, please.", 6)]
    assert [r.num_tiles for r in reqs] == [1, 4]
    engine = Engine(ours.model, image_token_id=ours.image_token_id)
    batch = engine.generate(reqs)
    expected = hf_generate(ref, reqs, ours.tokenizer.pad_id)
    for got, exp, req in zip(batch, expected, reqs, strict=True):
        assert got.tokens == exp
        assert engine.generate([req])[0].tokens == hf_generate(ref, [req], ours.tokenizer.pad_id)[0]
    assert batch[0].tokens != batch[1].tokens
