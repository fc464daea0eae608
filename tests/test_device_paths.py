"""Code paths chosen by device: the CUDA-only branches run on the CPU here and must give the same numbers;
the GPU tests compare a CUDA run with the CPU run (skipped where there is no CUDA device)."""

from __future__ import annotations

import pytest
import torch
from tiny_random import IMG, tiny_model

from ptp_cli.engine import Engine, Request
from ptp_cli.pruning import PruneConfig, make_method


def request(tiles: int) -> Request:
    g = torch.Generator().manual_seed(tiles)
    ids = [1, 5, *([IMG] * (256 * tiles)), 8, 20, 21, 22, 9]
    start = 2 + 256 * tiles + 1
    return Request(ids=ids, pixel_values=torch.randn(tiles, 3, 448, 448, generator=g), image_start=2,
                   instruction=(start, start + 3), max_new_tokens=4, ignore_eos=True)


def test_expanded_kv_heads_equal_native_gqa():
    """The CUDA path (k/v heads repeated before masked SDPA) equals the native enable_gqa path."""
    m = tiny_model()
    reqs = [request(1), request(2)]
    native = Engine(m, image_token_id=IMG).generate(reqs)
    for layer in m.language_model.layers:
        layer.attention.expand_kv = True
    expanded = Engine(m, image_token_id=IMG).generate(reqs)
    for a, b in zip(native, expanded, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["none", "ptp", "fastv"])
def test_cuda_matches_cpu(method: str):
    m = tiny_model()
    reqs = [request(1), request(3)]
    prune = PruneConfig(method=method, ratio=0.5)
    cpu = Engine(m, image_token_id=IMG, method=make_method(prune, m.cfg)).generate(reqs)
    gpu_model = m.to("cuda")
    gpu = Engine(gpu_model, image_token_id=IMG, method=make_method(prune, m.cfg)).generate(reqs)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.kept == b.kept
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_and_stays_close(dtype: torch.dtype):
    """bf16/fp16 weights: the engine runs every stage in that dtype; its first token's log-probability
    stays near the fp32 one (norms and the LM head run in fp32)."""
    m = tiny_model()
    reqs = [request(1), request(2)]
    ref = Engine(m, image_token_id=IMG).generate(reqs)
    low = Engine(m.to(dtype), image_token_id=IMG, method=make_method(PruneConfig(), m.cfg)).generate(reqs)
    for b in low:
        assert len(b.tokens) == 4 and all(v == v and v <= 0 for v in b.logprobs)  # no NaN
        assert b.visual_after == b.visual_before // 2
    m2 = tiny_model().to(dtype)
    same = Engine(m2, image_token_id=IMG).generate(reqs)
    for a, b in zip(ref, same, strict=True):
        assert b.logprobs[0] == pytest.approx(a.logprobs[0], abs=0.3)
