"""PTP step 2 (per-tile budgets) and the rounding rule: exact totals, caps, monotonicity, hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_cli.pruning.budgets import keep_count, region_budgets

ratios = st.floats(0.0, 0.999, allow_nan=False)
taus = st.floats(0.01, 100.0, allow_nan=False)


@st.composite
def samples(draw):
    tiles = draw(st.integers(1, 13))
    thumb = tiles > 1 and draw(st.booleans())
    regions = tiles - thumb
    scores = draw(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=regions, max_size=regions))
    return tiles, thumb, torch.tensor(scores, dtype=torch.float32)


def test_keep_count_rounds_half_to_even():
    # Python's round(): exact halves go to the even neighbour.
    assert keep_count(257, 0.5) == 128  # 128.5
    assert keep_count(259, 0.5) == 130  # 129.5
    assert keep_count(255, 0.5) == 128  # 127.5
    assert keep_count(256, 0.3) == 179  # 179.2
    assert keep_count(256, 0.0) == 256
    assert keep_count(10, 0.75) == 2  # 2.5


@settings(max_examples=300, deadline=None)
@given(samples(), ratios, taus, st.booleans())
def test_total_exact_and_capped(sample, ratio, tau, use_regions):
    tiles, thumb, scores = sample
    b = region_budgets(scores, tiles=tiles, has_thumbnail=thumb, ratio=ratio, tau=tau, use_regions=use_regions)
    assert len(b) == tiles
    assert sum(b) == round((1 - ratio) * 256 * tiles)
    assert all(0 <= x <= 256 for x in b)
    if thumb:
        assert b[-1] == round((1 - ratio) * 256)


@settings(max_examples=300, deadline=None)
@given(samples(), ratios, taus)
def test_monotone_in_region_score(sample, ratio, tau):
    tiles, thumb, scores = sample
    b = region_budgets(scores, tiles=tiles, has_thumbnail=thumb, ratio=ratio, tau=tau)
    r = scores.tolist()
    for i in range(len(r)):
        for j in range(len(r)):
            if r[i] > r[j]:
                assert b[i] >= b[j], (r, b)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 13), ratios)
def test_uniform_budgets_differ_by_at_most_one(tiles, ratio):
    b = region_budgets(None, tiles=tiles, has_thumbnail=True, ratio=ratio)
    regions = b[:-1]
    assert max(regions) - min(regions) <= 1
    assert regions == sorted(regions, reverse=True)  # extra units to the lower indices
    assert sum(b) == round((1 - ratio) * 256 * tiles)


@settings(max_examples=50, deadline=None)
@given(ratios)
def test_one_tile_keeps_k(ratio):
    assert region_budgets(None, tiles=1, has_thumbnail=False, ratio=ratio) == [round((1 - ratio) * 256)]
    # A lone tile is never a thumbnail, whatever the flag says.
    assert region_budgets(None, tiles=1, has_thumbnail=True, ratio=ratio) == [round((1 - ratio) * 256)]


@settings(max_examples=50, deadline=None)
@given(samples(), taus)
def test_ratio_zero_keeps_all(sample, tau):
    tiles, thumb, scores = sample
    assert region_budgets(scores, tiles=tiles, has_thumbnail=thumb, ratio=0.0, tau=tau) == [256] * tiles


def test_hand_worked_softmax_shares():
    # 3 regions + thumbnail, ratio 0.5: K = 512, b_g = 128, regions share 384.
    # p = softmax([1, 0, 0]) = [e, 1, 1] / (e + 2) = [0.5761, 0.2119, 0.2119]
    # quotas 221.23, 81.38, 81.38 -> floors 221, 81, 81 (383) -> one unit to the largest fraction:
    # 0.38 (tie between regions 1 and 2; equal p, so the lower index) -> [221, 82, 81].
    e = math.e
    quotas = [384 * e / (e + 2), 384 / (e + 2), 384 / (e + 2)]
    assert [math.floor(q) for q in quotas] == [221, 81, 81]
    b = region_budgets(torch.tensor([1.0, 0.0, 0.0]), tiles=4, has_thumbnail=True, ratio=0.5)
    assert b == [221, 82, 81, 128]


def test_cap_overflow_goes_to_next_region_in_order_of_p():
    # ratio 0.1: K = round(0.9 * 1024) = 922, b_g = round(230.4) = 230, regions share 692.
    # tau 0.05 puts nearly all of p on region 1 (score 1): it is capped at 256 and its overflow (436)
    # goes first to region 2 (the next score, 0.5), which fills to 256, then the last 180 to region 0.
    b = region_budgets(torch.tensor([0.0, 1.0, 0.5]), tiles=4, has_thumbnail=True, ratio=0.1, tau=0.05)
    assert b == [180, 256, 256, 230]


def test_temperature_sharpens():
    flat = region_budgets(torch.tensor([0.9, 0.1]), tiles=3, has_thumbnail=True, ratio=0.5, tau=100.0)
    sharp = region_budgets(torch.tensor([0.9, 0.1]), tiles=3, has_thumbnail=True, ratio=0.5, tau=0.1)
    assert abs(flat[0] - flat[1]) <= 2
    assert sharp[0] - sharp[1] > 200


def test_scores_count_checked():
    with pytest.raises(ValueError):
        region_budgets(torch.zeros(3), tiles=3, has_thumbnail=True, ratio=0.5)
