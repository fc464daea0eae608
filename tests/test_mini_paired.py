"""An accuracy claim that can fail: on ptp-mini, PTP@0.5 beats random@0.5 on the same questions, significantly.

Both runs answer the same fixed questions (a synth split whose seed training never used), so the comparison is
paired: McNemar's exact test on the questions where exactly one of them is right (``ptp_cli/eval/paired.py``).
Every run here uses the default ``--positions``. The check itself is tested to fail: fed random@0.5's answers in
place of PTP's (a second random draw), it must not pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_mini import needs_weights

from ptp_cli.eval.paired import Paired, mcnemar_greater, paired
from ptp_cli.io.records import iter_records
from ptp_cli.pruning import PruneConfig, make_method
from ptp_cli.run.engine import Engine
from ptp_cli.run.pipeline import Pipeline, RunConfig
from ptp_cli.run.vision_cache import VisionCache
from ptp_cli.synth import write_benchmark
from ptp_cli.zoo import load_model

# The split: seed 2027 (never trained on), its first 150 questions (25 of each type), up to 12 tiles. Measured on
# it with the default positions (docs/accuracy.md, "Positions and the baselines"; ptp eval, CPU, fp32): none
# 82.0%, PTP@0.5 80.0% (97.6% of none), random@0.5 66.7%; PTP right and random wrong on 24 questions, the reverse
# on 4: McNemar one-sided p = 9e-05. The thresholds leave room for noise across machines: p stays below 0.01 down
# to about 19 against 6, and 90% retention (111 of 123) is 9 questions under the measured 120.
SEED, N = 2027, 150
P_MAX = 0.01  # McNemar one-sided p of "PTP@0.5 beats random@0.5"
MIN_RETENTION = 0.90  # PTP@0.5 keeps at least this fraction of the unpruned accuracy


def claim_holds(ptp: list[bool], random: list[bool], none: list[bool]) -> tuple[bool, Paired]:
    """The claim this file guards: PTP beats random (paired, p < P_MAX) and keeps MIN_RETENTION of none."""
    test = paired(ptp, random)
    keeps = sum(ptp) >= MIN_RETENTION * sum(none)
    return test.p_greater < P_MAX and test.diff > 0 and keeps, test


def test_mcnemar_exact_values():
    assert mcnemar_greater(0, 0) == 1.0
    assert mcnemar_greater(5, 0) == 1 / 32
    assert abs(mcnemar_greater(8, 2) - 56 / 1024) < 1e-12  # P(X >= 8), X ~ Bin(10, 1/2)
    assert paired([True, True, False], [False, True, True]).diff == 0.0


def test_the_claim_fails_when_ptp_is_replaced_by_an_equal_method():
    """Two runs that are the same method cannot pass, whatever their draw; a clear win does."""
    right = [i % 3 != 0 for i in range(150)]
    assert not claim_holds(right, right, right)[0]
    shifted = right[1:] + right[:1]  # the same accuracy, other questions right
    assert not claim_holds(right, shifted, right)[0]
    better = [True] * 130 + [False] * 20
    worse = [True] * 100 + [False] * 50
    assert claim_holds(better, worse, better)[0]


def _right(loaded, gold: Path, prune: PruneConfig, cache: VisionCache, seed: int = 0) -> list[bool]:
    config = RunConfig(model="mini", prune=prune, max_new_tokens=4, batch_size=8, seed=seed)
    engine = Engine(loaded.model, image_token_id=loaded.image_token_id, method=make_method(prune, loaded.cfg),
                    vision_cache=cache)
    records = list(iter_records(gold))
    rows = list(Pipeline(loaded, config, engine=engine).infer(iter(records)))
    return [str(r.get("answer", "")).strip().lower() == rec.extra["answer"].lower()
            for r, rec in zip(rows, records, strict=True)]


@needs_weights
@pytest.mark.slow
def test_mini_ptp_beats_random_on_the_same_questions(tmp_path: Path):
    write_benchmark(tmp_path, n=N, seed=SEED)
    gold = tmp_path / "questions.jsonl"
    loaded, cache = load_model("mini"), VisionCache()
    ptp = _right(loaded, gold, PruneConfig(method="ptp", ratio=0.5), cache)  # first: its ViT pass serves all
    none = _right(loaded, gold, PruneConfig(method="none"), cache)
    random = _right(loaded, gold, PruneConfig(method="random", ratio=0.5), cache)
    holds, test = claim_holds(ptp, random, none)
    assert holds, (test, sum(ptp), sum(random), sum(none))
    # The same check on random@0.5 with another seed in PTP's place fails: it can tell a method from chance.
    other = _right(loaded, gold, PruneConfig(method="random", ratio=0.5), cache, seed=1)
    assert not claim_holds(other, random, none)[0]
