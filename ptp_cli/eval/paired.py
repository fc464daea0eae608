"""Paired comparisons of two runs over the same questions: McNemar's exact test and a paired bootstrap.

Both runs answer the same questions, so what differs is only where one is right and the other wrong (the
discordant pairs); McNemar's exact test asks how likely that split is if neither run is better. The bootstrap
resamples questions (pairs) to give an interval for the difference in accuracy. Pure Python, no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    """Run A against run B on the same n questions."""

    n: int  # questions
    a_only: int  # A right, B wrong
    b_only: int  # B right, A wrong
    p_greater: float  # one-sided exact McNemar p-value of "A is better than B"
    diff: float  # accuracy of A minus accuracy of B
    low: float  # 95% paired-bootstrap interval of diff
    high: float


def mcnemar_greater(a_only: int, b_only: int) -> float:
    """P(X >= a_only) for X ~ Binomial(a_only + b_only, 1/2): the exact one-sided McNemar p-value of "A wins"."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    return sum(math.comb(m, k) for k in range(a_only, m + 1)) / 2**m


def paired(a: Sequence[bool], b: Sequence[bool], *, resamples: int = 2000, seed: int = 0) -> Paired:
    """A against B on the same questions (a[i], b[i]: question i right). Raises ValueError on unequal lengths."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs need the same non-zero number of questions, got {len(a)} and {len(b)}")
    n = len(a)
    a_only = sum(x and not y for x, y in zip(a, b, strict=True))
    b_only = sum(y and not x for x, y in zip(a, b, strict=True))
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return Paired(n=n, a_only=a_only, b_only=b_only, p_greater=mcnemar_greater(a_only, b_only),
                  diff=sum(d) / n, low=means[int(0.025 * resamples)], high=means[int(0.975 * resamples) - 1])
