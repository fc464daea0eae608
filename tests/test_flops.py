"""Analytic FLOPs: InternVL2-2B stages against hand arithmetic written out with the real widths, plus properties."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptp_cli.config import SHAPES, LLMConfig
from ptp_cli.run.flops import (
    StageFlops,
    decode_flops,
    llm_layer_flops,
    prefill_flops,
    probe_flops,
    projector_flops,
    sample_flops,
    vit_flops,
    vit_score_flops,
)

CFG = SHAPES["internvl2-2b"]
TILES = 7  # 6 tiles + thumbnail
TEXT = 64  # non-visual prompt tokens
N_FULL = TEXT + 1792  # 7 * 256 visual tokens
N_HALF = TEXT + 896  # ratio 0.5

# InternVL2-2B by hand, 2 FLOPs per multiply-add.
# ViT (InternViT-300M): C=1024, I=4096, 16 heads x 64, 1025 tokens, 24 layers; conv 3*14*14 -> 1024 on 1024 patches.
VIT_PATCH_EMBED = 2 * 1024 * (3 * 14 * 14) * 1024
VIT_LAYER = (
    2 * 1025 * (1024 * 3072 + 1024 * 1024 + 1024 * 4096 + 4096 * 1024) + 2 * 2 * (16 * 64) * 1025 * 1025
)
VIT_TILE = VIT_PATCH_EMBED + 24 * VIT_LAYER
# Projector: 256 tokens a tile, Linear 4096 -> 2048, Linear 2048 -> 2048.
PROJ_TILE = 2 * 256 * (4096 * 2048 + 2048 * 2048)
# LLM (InternLM2-1.8B): D=2048, 16 q heads, 8 kv heads, hd 128, SwiGLU 8192, vocab 92553, 24 layers.
Q_PROJ = 2048 * 2048  # 16*128 = 2048
K_PROJ = 2048 * 1024  # 8*128 = 1024
V_PROJ = 2048 * 1024
O_PROJ = 2048 * 2048
MLP = 2048 * 8192 + 2048 * 8192 + 8192 * 2048  # gate, up, down
LLM_TOKEN = 2 * (Q_PROJ + K_PROJ + V_PROJ + O_PROJ + MLP)  # per token per layer
PAIR = 2 * 16 * 128 + 2 * 16 * 128  # QK^T + AV per (query, key) pair
HEAD = 2 * 2048 * 92553


def hand_prefill(n: int) -> int:
    total = 0
    for _layer in range(24):
        total += n * LLM_TOKEN
        for p in range(n):  # token at position p attends p + 1 keys
            total += (p + 1) * PAIR
    return total + HEAD  # logits for the last position only


def hand_decode(cache: int, steps: int) -> int:
    total = 0
    for t in range(steps):
        for _layer in range(24):
            total += LLM_TOKEN + (cache + t + 1) * PAIR
        total += HEAD
    return total


def test_vit_and_projector_internvl2_2b() -> None:
    assert vit_flops(CFG.vision, num_tiles=TILES) == 7 * VIT_TILE
    assert vit_flops(CFG.vision, num_tiles=1, layers=12) == VIT_PATCH_EMBED + 12 * VIT_LAYER
    assert projector_flops(CFG, num_tiles=TILES) == 7 * PROJ_TILE
    assert vit_score_flops(CFG.vision, num_tiles=TILES) == 7 * 2 * 1025 * 16 * 64
    assert 5.0e12 < 7 * VIT_TILE < 5.2e12  # ~5.07 TFLOPs


def test_prefill_unpruned_internvl2_2b() -> None:
    assert prefill_flops(CFG.llm, layer_lengths=[N_FULL] * 24) == hand_prefill(N_FULL)


def test_prefill_ratio_half_reduction() -> None:
    full = prefill_flops(CFG.llm, layer_lengths=[N_FULL] * 24)
    half = prefill_flops(CFG.llm, layer_lengths=[N_HALF] * 24)
    assert half == hand_prefill(N_HALF)
    ratio = Fraction(half, full)
    assert ratio == Fraction(hand_prefill(N_HALF), hand_prefill(N_FULL))
    # quadratic attention shrinks faster than the token count: below 960/1856 ~ 0.517
    assert ratio < Fraction(N_HALF, N_FULL)
    assert 0.50 < float(ratio) < 0.51  # ~0.503


def test_decode_16_steps_internvl2_2b() -> None:
    assert decode_flops(CFG.llm, layer_cache_lengths=[N_FULL] * 24, steps=16) == hand_decode(N_FULL, 16)
    assert decode_flops(CFG.llm, layer_cache_lengths=[N_FULL] * 24, steps=0) == 0


def test_probe_internvl2_2b() -> None:
    q = 20  # instruction tokens, the last 20 positions
    layer0 = N_FULL * LLM_TOKEN + sum(p + 1 for p in range(N_FULL)) * PAIR
    layer1 = 2 * q * Q_PROJ + 2 * N_FULL * K_PROJ + sum(N_FULL - i for i in range(q)) * (2 * 16 * 128)
    assert probe_flops(CFG.llm, seq_len=N_FULL, llm_layer=1, num_instruction_tokens=q) == layer0 + layer1
    # M = 0: no full layer, only the scoring projections and QK^T
    assert probe_flops(CFG.llm, seq_len=N_FULL, llm_layer=0, num_instruction_tokens=q) == layer1


def test_sample_flops_ptp_and_unpruned() -> None:
    full = sample_flops(CFG, num_tiles=TILES, text_tokens=TEXT, kept_visual=1792, generated=16)
    assert full == StageFlops(
        vit=7 * VIT_TILE + 7 * PROJ_TILE,
        probe=0,
        prefill=hand_prefill(N_FULL),
        decode=hand_decode(N_FULL, 15),  # the first of 16 tokens comes from the prefill
    )
    ptp = sample_flops(
        CFG, num_tiles=TILES, text_tokens=TEXT, kept_visual=896, generated=16, probe=(1, 20), vit_score=True
    )
    assert ptp.vit == 7 * VIT_TILE + 7 * PROJ_TILE + 7 * 2 * 1025 * 16 * 64
    assert ptp.probe == probe_flops(CFG.llm, seq_len=N_FULL, llm_layer=1, num_instruction_tokens=20)
    assert ptp.prefill == hand_prefill(N_HALF)
    assert ptp.decode == hand_decode(N_HALF, 15)
    assert ptp.total == ptp.vit + ptp.probe + ptp.prefill + ptp.decode < full.total
    assert ptp.as_dict() == {
        "vit": ptp.vit,
        "probe": ptp.probe,
        "prefill": ptp.prefill,
        "decode": ptp.decode,
        "total": ptp.total,
    }
    none = sample_flops(CFG, num_tiles=TILES, text_tokens=TEXT, kept_visual=1792, generated=0)
    assert none.prefill == hand_prefill(N_FULL) - HEAD and none.decode == 0


def test_sample_flops_in_llm_pruning_lengths() -> None:
    # VTW-style: visual tokens withdrawn after layer 12
    lengths = [N_FULL] * 12 + [TEXT] * 12
    got = sample_flops(
        CFG, num_tiles=TILES, text_tokens=TEXT, kept_visual=1792, generated=4, layer_lengths=lengths
    )
    layer_full = N_FULL * LLM_TOKEN + N_FULL * (N_FULL + 1) // 2 * PAIR
    layer_text = TEXT * LLM_TOKEN + TEXT * (TEXT + 1) // 2 * PAIR
    assert got.prefill == 12 * layer_full + 12 * layer_text + HEAD
    step_pairs = sum(12 * (N_FULL + t + 1) + 12 * (TEXT + t + 1) for t in range(3))
    assert got.decode == 3 * (24 * LLM_TOKEN + HEAD) + step_pairs * PAIR


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one entry per LLM layer"):
        prefill_flops(CFG.llm, layer_lengths=[10] * 23)
    with pytest.raises(ValueError, match="one entry per LLM layer"):
        decode_flops(CFG.llm, layer_cache_lengths=[10] * 25, steps=1)
    with pytest.raises(ValueError, match="llm_layer"):
        probe_flops(CFG.llm, seq_len=100, llm_layer=24, num_instruction_tokens=5)
    with pytest.raises(ValueError, match="num_instruction_tokens"):
        probe_flops(CFG.llm, seq_len=4, llm_layer=1, num_instruction_tokens=5)
    with pytest.raises(ValueError, match="layers"):
        vit_flops(CFG.vision, num_tiles=1, layers=25)
    with pytest.raises(ValueError, match="steps"):
        decode_flops(CFG.llm, layer_cache_lengths=[1] * 24, steps=-1)


# Properties on small random LLM shapes.


@st.composite
def llm_configs(draw: st.DrawFn) -> LLMConfig:
    kv = draw(st.integers(1, 4))
    heads = kv * draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 16))
    return LLMConfig(
        vocab_size=draw(st.integers(0, 500)),
        hidden_size=draw(st.integers(1, 64)),
        intermediate_size=draw(st.integers(1, 128)),
        num_layers=draw(st.integers(1, 4)),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim_override=head_dim,
    )


lengths = st.integers(0, 300)


@given(cfg=llm_configs(), data=st.data())
def test_prefill_monotone_in_lengths(cfg: LLMConfig, data: st.DataObject) -> None:
    base = data.draw(st.lists(lengths, min_size=cfg.num_layers, max_size=cfg.num_layers))
    j = data.draw(st.integers(0, cfg.num_layers - 1))
    more = [*base]
    more[j] += data.draw(st.integers(1, 50))
    assert prefill_flops(cfg, layer_lengths=more) > prefill_flops(cfg, layer_lengths=base)
    assert decode_flops(cfg, layer_cache_lengths=more, steps=3) > decode_flops(
        cfg, layer_cache_lengths=base, steps=3
    )


@given(cfg=llm_configs(), n=lengths)
def test_prefill_equal_lengths_is_sum_of_layers(cfg: LLMConfig, n: int) -> None:
    layer = llm_layer_flops(cfg, num_queries=n, keys_per_query_total=sum(range(1, n + 1)))
    head = 2 * cfg.hidden_size * cfg.vocab_size
    assert prefill_flops(cfg, layer_lengths=[n] * cfg.num_layers) == cfg.num_layers * layer + head
    assert (
        prefill_flops(cfg, layer_lengths=[n] * cfg.num_layers, lm_head_positions=0) == cfg.num_layers * layer
    )


@given(cfg=llm_configs(), n=lengths, steps=st.integers(0, 40))
def test_decode_continues_prefill(cfg: LLMConfig, n: int, steps: int) -> None:
    # feeding `steps` tokens one at a time costs what a longer prefill costs for them (plus one LM head each)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    short = prefill_flops(cfg, layer_lengths=[n] * cfg.num_layers, lm_head_positions=0)
    long = prefill_flops(cfg, layer_lengths=[n + steps] * cfg.num_layers, lm_head_positions=0)
    assert (
        decode_flops(cfg, layer_cache_lengths=[n] * cfg.num_layers, steps=steps)
        == long - short + steps * head
    )


@given(cfg=llm_configs(), n=lengths, a=st.integers(0, 20), b=st.integers(0, 20))
def test_decode_splits_over_steps(cfg: LLMConfig, n: int, a: int, b: int) -> None:
    whole = decode_flops(cfg, layer_cache_lengths=[n] * cfg.num_layers, steps=a + b)
    first = decode_flops(cfg, layer_cache_lengths=[n] * cfg.num_layers, steps=a)
    rest = decode_flops(cfg, layer_cache_lengths=[n + a] * cfg.num_layers, steps=b)
    assert whole == first + rest


@given(cfg=llm_configs(), n=st.integers(1, 300), pairs=st.integers(0, 10_000))
def test_gqa_cuts_only_kv_projections(cfg: LLMConfig, n: int, pairs: int) -> None:
    mha = replace(cfg, num_kv_heads=cfg.num_heads)
    gqa = llm_layer_flops(cfg, num_queries=n, keys_per_query_total=pairs)
    full = llm_layer_flops(mha, num_queries=n, keys_per_query_total=pairs)
    saved_heads = cfg.num_heads - cfg.num_kv_heads
    assert full - gqa == 2 * n * 2 * cfg.hidden_size * saved_heads * cfg.head_dim  # k and v
    assert (gqa < full) == (saved_heads > 0)


@given(cfg=llm_configs(), n=st.integers(1, 300), q=st.integers(1, 30))
def test_probe_costs_less_than_one_more_layer(cfg: LLMConfig, n: int, q: int) -> None:
    q = min(q, n)
    for m in range(cfg.num_layers):
        probe = probe_flops(cfg, seq_len=n, llm_layer=m, num_instruction_tokens=q)
        full_m_plus_1 = (m + 1) * llm_layer_flops(cfg, num_queries=n, keys_per_query_total=n * (n + 1) // 2)
        assert probe < full_m_plus_1
