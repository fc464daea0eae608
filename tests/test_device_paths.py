"""Code paths chosen by device or dtype: the CUDA-only branch runs on the CPU here (through its argument) and must
give the same numbers; the GPU tests compare a CUDA run with the CPU run (skipped where there is no CUDA device)."""

from __future__ import annotations

import pytest
import torch
from tiny_random import IMG, forced_logits, tiny_model

from ptp_cli.models.llm import attention_mask, grouped_sdpa
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.engine import Engine, Request


def request(tiles: int) -> Request:
    g = torch.Generator().manual_seed(tiles)
    ids = [1, 5, *([IMG] * (256 * tiles)), 8, 20, 21, 22, 9]
    start = 2 + 256 * tiles + 1
    return Request(ids=ids, pixel_values=torch.randn(tiles, 3, 448, 448, generator=g), image_start=2,
                   instruction=(start, start + 3), max_new_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("causal", [False, True])
def test_repeated_kv_heads_equal_native_gqa(causal: bool):
    """The CUDA path (k/v heads repeated before SDPA) and the native enable_gqa path both equal attention written
    out by hand (query head h reads key head h // g), padding hidden by a mask."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, s, hd = 2, 8, 2, 7, 16
    q, k, v = (torch.randn(b, h, s, hd, generator=g) for h in (hq, hkv, hkv))
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, 5:] = False  # a right-padded row
    mask = None if causal else attention_mask(valid, 0, s)
    k_full, v_full = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scores = (q @ k_full.transpose(-1, -2)) * hd**-0.5  # [B, Hq, S, S]
    allowed = torch.ones(s, s, dtype=torch.bool).tril() if causal else mask
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v_full
    for repeat in (False, True):
        got = grouped_sdpa(q, k, v, mask, causal=causal, repeat_kv=repeat)
        assert (got - expected).abs().max().item() < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["none", "ptp", "fastv"])
def test_cuda_matches_cpu(method: str):
    """fp32 on both (TF32 off for the patch-embedding convolution; matmuls default to full fp32): the same kept
    tokens and ids, log-probabilities equal up to fp32 summation order."""
    m = tiny_model()
    reqs = [request(1), request(3)]
    prune = PruneConfig(method=method, ratio=0.5)
    cpu = Engine(m, image_token_id=IMG, method=make_method(prune, m.cfg)).generate(reqs)
    assert not torch.backends.cuda.matmul.allow_tf32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gpu_model = m.to("cuda")
        gpu = Engine(gpu_model, image_token_id=IMG, method=make_method(prune, m.cfg)).generate(reqs)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.kept == b.kept
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stays_within_its_rounding(dtype: torch.dtype):
    """bf16/fp16 weights: every stage runs in that dtype (norms, softmax and the LM head in fp32). Fed the same
    tokens, each step's log-probabilities over the whole vocabulary stay within 3 units of the dtype's rounding
    (eps) of the fp32 ones: rounding weights and activations to the dtype moves them by about 1 eps here."""
    reqs = [request(1), request(2)]
    tokens = torch.randint(0, 290, (2, 4), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = forced_logits(Engine(tiny_model(), image_token_id=IMG), reqs, tokens)
        low = forced_logits(Engine(tiny_model().to(dtype), image_token_id=IMG), reqs, tokens)
    for a, b in zip(ref, low, strict=True):
        assert (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item() < 3 * torch.finfo(dtype).eps
    m = tiny_model().to(dtype)
    for b in Engine(m, image_token_id=IMG, method=make_method(PruneConfig(), m.cfg)).generate(reqs):
        assert len(b.tokens) == 4 and all(v == v and v <= 0 for v in b.logprobs)  # no NaN
        assert b.visual_after == b.visual_before // 2
