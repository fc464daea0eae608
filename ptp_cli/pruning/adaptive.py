"""``--alpha auto``: PTP's fusion weight chosen per sample from signals the scores already hold.

Two signals, each a float in [0, 1] computed from one sample's raw scores over all its visual tokens (every
tile, thumbnail included, before PTP's per-tile min-max normalisation):

* ``c_concentration``: how concentrated the instruction score c is (the question's attention over the image);
* ``s_concentration``: how concentrated the token score s is (the ViT's CLS saliency).

``auto_alpha`` maps them to alpha. It is the only rule: to try another, replace that one function (it takes
the two floats and nothing else, so the signals stay comparable across rules).

Everything here works on one sample at a time, so a sample's alpha never depends on the batch around it.
"""

from __future__ import annotations

import math

import torch


def concentration(x: torch.Tensor) -> float:
    """1 - H(p) / log(N) of p = x / sum(x) over the N entries of a non-negative score tensor (any shape).

    0 for a flat x, 1 for a one-hot x, in between otherwise. Degenerate cases give 0 (nothing stands out):
    an all-zero x, and N <= 1 (log N = 0). Negative entries (none in attention scores) count as 0.
    Computed in float64 so that the value does not depend on the dtype the scores came in.
    """
    p = x.detach().flatten().double().clamp(min=0)  # [N]
    n, total = p.numel(), float(p.sum())
    if n <= 1 or total <= 0:
        return 0.0
    entropy = float(torch.special.entr(p / total).sum())  # -sum p log p, with 0 log 0 = 0
    return min(max(1.0 - entropy / math.log(n), 0.0), 1.0)


def signals(*, token_scores: torch.Tensor | None, instruction_scores: torch.Tensor | None) -> dict[str, float]:
    """The signals of one sample from the scores it has: s [T, 256] and c [T * 256] (either may be None).

    Keys: ``s_concentration`` when s is given, ``c_concentration`` when c is given.
    """
    out: dict[str, float] = {}
    if instruction_scores is not None:
        out["c_concentration"] = concentration(instruction_scores)
    if token_scores is not None:
        out["s_concentration"] = concentration(token_scores)
    return out


def auto_alpha(s_conc: float, c_conc: float) -> float:
    """alpha = c_conc / (c_conc + s_conc): the share of the total concentration that is the instruction's.

    Why: a question that points at one object makes the instruction attention c peak on it, and then c knows
    where to look better than a question-blind saliency does -> trust c (alpha near 1). A flat c says the
    question does not localise (read everything, describe the scene, an OCR-style question whose words match
    no image region) -> trust the saliency s (alpha near 0). When both are equally peaked, or both flat
    (0 / 0), neither is preferred: 0.5, the paper's default. The result is clipped to [0, 1].
    """
    total = c_conc + s_conc
    if total <= 0:
        return 0.5
    return min(max(c_conc / total, 0.0), 1.0)
