"""Position-dependent RoPE scaling (Phi-3's longrope, dynamic NTK) is chosen per sample and per step.

The reference is transformers' own model generating each sample alone from its input embeddings, as the official
InternVL ``chat()`` calls it: every forward pass picks its frequencies from ``max(position_ids) + 1``, so a prompt
within the original context is encoded with the short factors, and once a sample grows past it the new tokens use
the long ones while keys already in the cache keep theirs. ptp must give each sample exactly those tokens, alone
and in a batch with samples on the other side of the threshold.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_parity import randomize_, write_original
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from ptp_cli.loading import LoadedModel, load_model
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.engine import Engine, Request
from ptp_cli.text.tokenization import load_tokenizer

THRESHOLD = 290  # original_max_position_embeddings (longrope) / max_position_embeddings (dynamic NTK)
NEW = 24
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}
# (tiles, text tokens): prompts of 262 (stays short), 272 (crosses the threshold while decoding), exactly 290
# (short prefill, long from the first decoding step) and 522 tokens (long from the start).
SHAPES = [(1, 6), (1, 16), (1, 34), (2, 10)]


def checkpoint(ref: torch.nn.Module, out: Path, tokenizer_dir: Path) -> LoadedModel:
    """ref (seeded random weights) as an InternVLChatModel checkpoint with a random ViT, loaded by ptp."""
    ref.config._attn_implementation = "eager"
    randomize_(ref, seed=50)
    state = {"language_model." + k: v for k, v in ref.state_dict().items()}
    llm_config = {**ref.config.to_dict(), "architectures": [type(ref).__name__]}
    write_original(out, state, llm_config, tokenizer_dir, template="phi3-chat")
    return load_model(str(out))


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[LoadedModel, Phi3ForCausalLM]:
    hd = LLM["hidden_size"] // LLM["num_attention_heads"]
    scaling = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0 + 0.1 * i for i in range(hd // 2)],
               "long_factor": [1.0 + 2.0 * i for i in range(hd // 2)]}
    ref = Phi3ForCausalLM(Phi3Config(
        **LLM, vocab_size=load_tokenizer(tokenizer_dir).vocab_size, max_position_embeddings=4 * THRESHOLD,
        original_max_position_embeddings=THRESHOLD, rope_parameters=scaling, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ))
    ours = checkpoint(ref, tmp_path_factory.mktemp("phi3"), tokenizer_dir)
    assert ours.cfg.llm.rope_scaling["rope_type"] == "longrope"
    return ours, ref


def requests(ours: LoadedModel) -> list[Request]:
    img = ours.image_token_id
    out = []
    for i, (tiles, text) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(i)
        words = torch.randint(3, 200, (text,), generator=g).tolist()
        ids = words[:2] + [img] * (256 * tiles) + words[2:]
        out.append(Request(ids=ids, pixel_values=torch.randn(tiles, 3, 448, 448, generator=g), image_start=2,
                           instruction=(2 + 256 * tiles, len(ids)), max_new_tokens=NEW, ignore_eos=True,
                           has_thumbnail=tiles > 1))
    return out


def reference_generate(ours: LoadedModel, ref: torch.nn.Module, req: Request) -> list[int]:
    """transformers generating one sample alone from its input embeddings (visual features written over the
    placeholders, as InternVL's chat() does), greedy, on a fresh copy (dynamic NTK keeps state between calls)."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        feats = ours.model.vision_features(req.pixel_values).features.flatten(0, 1)  # [T*256, D]
        emb = ref.get_input_embeddings()(torch.tensor(req.ids))
        emb[req.image_start : req.image_start + feats.shape[0]] = feats
        out = ref.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                           max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, -NEW:].tolist()


def assert_batch_and_alone_match_reference(ours: LoadedModel, ref: torch.nn.Module) -> None:
    """ptp's greedy ids for the mixed batch, and for each sample alone, equal the reference's for that sample."""
    reqs = requests(ours)
    lengths = [len(r.ids) for r in reqs]
    assert lengths[1] < THRESHOLD < lengths[1] + NEW and lengths[2] == THRESHOLD and lengths[3] > THRESHOLD
    engine = Engine(ours.model, image_token_id=ours.image_token_id)
    batch = engine.generate(reqs)
    for req, got in zip(reqs, batch, strict=True):
        expected = reference_generate(ours, ref, req)
        assert engine.generate([req])[0].tokens == expected
        assert got.tokens == expected


def test_phi3_longrope_per_sample_and_step_matches_transformers(phi3):
    assert_batch_and_alone_match_reference(*phi3)


@pytest.mark.parametrize("method", ["ptp", "fastv"])
def test_phi3_mixed_batch_equals_each_alone_with_pruning(phi3, method: str):
    """The PTP probe (layers 0..M, then q/k recomputed at M) and FastV's in-LLM ranking use each row's own
    scaling too: a sample's kept tokens and answer do not depend on batch-mates across the threshold."""
    ours, _ = phi3
    reqs = requests(ours)
    prune = PruneConfig(method=method, ratio=0.5, vit_layer=1, llm_layer=1, fastv_layer=1)
    engine = Engine(ours.model, image_token_id=ours.image_token_id, method=make_method(prune, ours.cfg))
    batch = engine.generate(reqs)
    for req, got in zip(reqs, batch, strict=True):
        (alone,) = engine.generate([req])
        assert (got.kept, got.tokens) == (alone.kept, alone.tokens)
    if method == "ptp":  # the probe's scores themselves, to float32 rounding
        features = engine.encode_images(reqs).features
        scores = engine.probe(reqs, features)
        for i, req in enumerate(reqs):
            (alone,) = engine.probe([req], features[i : i + 1])
            assert (scores[i] - alone).abs().max().item() < 1e-6


def test_dynamic_ntk_per_sample_and_step_matches_transformers(tmp_path: Path, tokenizer_dir: Path):
    """Dynamic NTK rescales the base from the sequence's current length once past the trained context."""
    ref = LlamaForCausalLM(LlamaConfig(
        **LLM, vocab_size=load_tokenizer(tokenizer_dir).vocab_size, max_position_embeddings=THRESHOLD,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4},
    ))
    ours = checkpoint(ref, tmp_path, tokenizer_dir)
    assert ours.cfg.llm.rope_scaling["rope_type"] == "dynamic"
    assert_batch_and_alone_match_reference(ours, ref)
