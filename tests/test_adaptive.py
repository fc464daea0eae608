"""``--alpha auto``: the concentration signals and the rule on planted score maps, PTP with the rule (engine and
rows), and the setting from every source (command line, environment, YAML, presets, --resume, ptp eval)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_cli import error_line, parse_rows, ptp, records, write_jsonl
from test_pruning import make_request, planted_ctx, run
from tiny_random import CFG, tiny_model

from ptp_cli.cli import options as opt
from ptp_cli.errors import UsageError
from ptp_cli.models.internvl import InternVLModel
from ptp_cli.pruning import PRESETS, PruneConfig, make_method
from ptp_cli.pruning.adaptive import auto_alpha, concentration, signals
from ptp_cli.settings import parse_text

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
TINY_RUN = ["--model", "tiny", "--max-new-tokens", "2", "--max-tiles", "2"]


def peaked(n: int, at: int = 3) -> torch.Tensor:
    """A map with one strong token over a low floor (how a question that names one object looks in c)."""
    return torch.full((n,), 1e-4).index_fill(0, torch.tensor([at]), 1.0)


def bumpy(n: int) -> torch.Tensor:
    """A nearly flat map (1 +- 1 %): a saliency that singles out nothing."""
    return 1 + 0.01 * torch.rand(n, generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    return tiny_model()


# ---------------------------------------------------------------------------------------------- the signals


def test_concentration_from_flat_to_one_hot():
    assert concentration(torch.full((768,), 0.3)) == pytest.approx(0.0, abs=1e-12)
    assert concentration(torch.zeros(768).index_fill(0, torch.tensor([5]), 2.0)) == pytest.approx(1.0)
    for k in (2, 16, 200):  # p uniform on k of N entries: H = log k, so 1 - log k / log N
        x = torch.zeros(3, 256)
        x.view(-1)[torch.randperm(768, generator=torch.Generator().manual_seed(k))[:k]] = 7.0
        assert concentration(x) == pytest.approx(1 - math.log(k) / math.log(768), rel=1e-9)
    x = torch.rand(2, 256, generator=torch.Generator().manual_seed(0))
    assert concentration(x) == pytest.approx(concentration(32 * x), rel=1e-12)  # scale-free (32: exact in fp32)
    assert concentration(x.half()) == pytest.approx(concentration(x.half().float()), rel=1e-12)


def test_concentration_degenerate_cases_are_zero():
    assert concentration(torch.zeros(512)) == 0.0
    assert concentration(torch.tensor([4.0])) == 0.0  # N == 1: log N == 0
    assert concentration(torch.zeros(0)) == 0.0


def test_signals_name_only_the_scores_given():
    s, c = bumpy(512).view(2, 256), peaked(512)
    assert signals(token_scores=s, instruction_scores=c) == {
        "s_concentration": concentration(s), "c_concentration": concentration(c)}
    assert set(signals(token_scores=s, instruction_scores=None)) == {"s_concentration"}
    assert set(signals(token_scores=None, instruction_scores=c)) == {"c_concentration"}


# ---------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("s", "c", "low", "high"),
    [
        (bumpy(768).view(3, 256), peaked(768), 0.99, 1.0),  # the question localises: trust c
        (peaked(768).view(3, 256), bumpy(768), 0.0, 0.01),  # it does not: trust the saliency s
        (peaked(768).view(3, 256), peaked(768), 0.5, 0.5),  # equally peaked: neither
        (torch.zeros(3, 256), torch.zeros(768), 0.5, 0.5),  # nothing to go on: the default
        (torch.full((3, 256), 2.0), torch.full((768,), 0.1), 0.5, 0.5),  # both flat (0 / 0): the default
    ],
)
def test_rule_on_planted_score_maps(s, c, low, high):
    found = signals(token_scores=s, instruction_scores=c)
    assert low <= auto_alpha(found["s_concentration"], found["c_concentration"]) <= high


def test_rule_is_the_share_of_concentration_and_stays_in_range():
    assert auto_alpha(0.25, 0.75) == pytest.approx(0.75)
    assert auto_alpha(0.3, 0.1) == pytest.approx(0.25)
    assert auto_alpha(0.0, 0.0) == 0.5
    assert auto_alpha(0.0, 0.2) == 1.0 and auto_alpha(0.2, 0.0) == 0.0
    assert 0.0 <= auto_alpha(-0.1, 0.2) <= 1.0 and 0.0 <= auto_alpha(0.2, -0.1) <= 1.0


# ---------------------------------------------------------------------------------------------- PTP with the rule


def test_auto_ranks_exactly_as_the_alpha_it_chose():
    ctx = planted_ctx()
    (kept,) = make_method(PruneConfig(alpha="auto"), CFG).select(ctx)
    (note,) = ctx.notes
    assert note["alpha"] == auto_alpha(note["s_concentration"], note["c_concentration"])
    assert 0.0 < note["alpha"] < 1.0 and note["alpha"] != 0.5  # planted maps of different concentration
    fixed_ctx = planted_ctx()
    (fixed,) = make_method(PruneConfig(alpha=note["alpha"]), CFG).select(fixed_ctx)
    assert kept is not None and fixed is not None and kept.tolist() == fixed.tolist()
    assert fixed_ctx.notes == ctx.notes  # a fixed alpha notes the same signals


@pytest.mark.parametrize(
    ("cfg", "keys"),
    [
        (PruneConfig(alpha=0.0), {"alpha", "s_concentration"}),  # no probe: no c
        (PruneConfig(alpha=1.0), {"alpha", "c_concentration"}),  # no ViT read-out: no s
        (PruneConfig(alpha=0.5, use_token_score=False), {"alpha", "c_concentration"}),
        (PruneConfig(alpha="auto"), {"alpha", "s_concentration", "c_concentration"}),
        (PruneConfig(alpha="auto", ratio=0.0), set()),  # nothing is ranked at ratio 0
        (PruneConfig(method="spatial"), set()),  # other methods note nothing
    ],
)
def test_notes_hold_the_alpha_and_the_signals_computed(cfg, keys):
    ctx = planted_ctx()
    if not cfg.use_token_score:
        ctx = replace(ctx, token_scores=None, notes=[])
    make_method(cfg, CFG).select(ctx)
    assert set(ctx.notes[0]) == keys
    if keys and cfg.alpha != "auto":
        assert ctx.notes[0]["alpha"] == cfg.alpha


def test_auto_needs_both_scores_and_runs_the_probe():
    m = make_method(PruneConfig(alpha="auto"), CFG)
    assert (m.vit_score_layer(), m.probe_layer()) == (11, 1)
    assert m.settings()["alpha"] == "auto"
    with pytest.raises(UsageError, match="--no-token-score does not go with --alpha auto"):
        PruneConfig(alpha="auto", use_token_score=False)


def test_engine_notes_per_sample_alphas_that_a_fixed_alpha_reproduces(model):
    reqs = [make_request(1, 4, seed=1), make_request(3, 9, seed=2)]
    auto = [run(model, make_method(PruneConfig(alpha="auto"), CFG), [req])[0] for req in reqs]  # each alone
    alphas = [r.pruning["alpha"] for r in auto]
    assert len(set(alphas)) == 2, "every sample got the same alpha: the batch test would prove nothing"
    for req, r in zip(reqs, auto, strict=True):
        assert r.pruning["alpha"] == auto_alpha(r.pruning["s_concentration"], r.pruning["c_concentration"])
        (fixed,) = run(model, make_method(PruneConfig(alpha=r.pruning["alpha"]), CFG), [req])
        assert fixed.kept == r.kept and fixed.pruning == r.pruning


# ---------------------------------------------------------------------------------------------- settings


def test_every_source_takes_a_number_or_auto(tmp_path: Path):
    PruneConfig(alpha="auto")
    PruneConfig(alpha=0.0)
    for bad in ("foo", 1.5, -0.1):
        with pytest.raises(UsageError, match=r"--alpha must be in \[0, 1\] or auto"):
            PruneConfig(alpha=bad)
    assert parse_text("float_or_auto", " Auto ") == "auto" and parse_text("float_or_auto", "0.25") == 0.25
    with pytest.raises(ValueError):
        parse_text("float_or_auto", "nan")
    (tmp_path / "a.yaml").write_text("alpha: auto\n")
    (tmp_path / "b.yaml").write_text("alpha: 1\n")
    (tmp_path / "c.yaml").write_text("alpha: [0.5]\n")
    assert opt.read_yaml(tmp_path / "a.yaml") == {"alpha": "auto"}
    assert opt.read_yaml(tmp_path / "b.yaml") == {"alpha": "1.0"}  # as the option takes it: text
    with pytest.raises(UsageError, match="--alpha must be a number or auto"):
        opt.read_yaml(tmp_path / "c.yaml")
    for given, preset in (({"alpha": "auto"}, "ocr"), ({"alpha": 0.3}, "scene")):
        cfg = opt.prune_config(opt.Resolved(given | {"preset": preset}, {}))
        assert cfg == replace(PRESETS[preset], alpha=given["alpha"])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--alpha", "foo"], "--alpha must be a number or auto, got 'foo'"),
        (["--alpha", "1.5"], "--alpha must be in [0, 1] or auto, got 1.5"),
        (["--alpha", "auto", "--no-token-score"], "--no-token-score does not go with --alpha auto"),
    ],
)
def test_bad_alpha_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragment: str):
    result = ptp("infer", str(SAMPLES / "questions.jsonl"), "--model", "/nonexistent", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == b""
    assert fragment in error_line(result.stderr)


# ---------------------------------------------------------------------------------------------- end to end


def test_infer_on_the_samples_reports_the_alpha_used(tmp_path: Path, ptp_home: Path):
    result = ptp("infer", str(SAMPLES / "questions.jsonl"), *TINY_RUN, "--alpha", "auto", home=ptp_home,
                 cwd=tmp_path)
    assert result.returncode == 3, result.stderr.decode()  # the samples hold one record with a missing image
    rows = parse_rows(result.stdout)
    ok = [r for r in rows if "error" not in r]
    assert len(ok) == len(rows) - 1 >= 4 and "pruning" not in next(r for r in rows if "error" in r)
    assert len({r["pruning"]["alpha"] for r in ok}) > 1  # chosen per sample
    for r in ok:
        note = r["pruning"]
        assert r["settings"]["alpha"] == "auto" and set(note) == {"alpha", "s_concentration", "c_concentration"}
        assert note["alpha"] == auto_alpha(note["s_concentration"], note["c_concentration"])  # JSON keeps float64


@pytest.mark.slow  # in CI's own step (.ci/run): keeps the default run under 10 minutes on 2 cores
def test_yaml_auto_runs_and_resume_refuses_a_change_of_alpha(tmp_path: Path, ptp_home: Path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "img.png")
    write_jsonl(tmp_path / "in.jsonl", records(2, "img.png"))
    (tmp_path / "auto.yaml").write_text("alpha: auto\n")
    args = ["infer", "in.jsonl", *TINY_RUN, "-o", "out.jsonl", "--resume"]
    first = ptp(*args, "--alpha", "0.5", home=ptp_home, cwd=tmp_path)
    assert first.returncode == 0, first.stderr.decode()
    before = (tmp_path / "out.jsonl").read_bytes()
    assert all(r["pruning"]["alpha"] == 0.5 for r in parse_rows(before))  # a fixed alpha is reported too
    refused = ptp(*args, "--config", "auto.yaml", home=ptp_home, cwd=tmp_path)
    assert refused.returncode == 2
    assert 'alpha 0.5 -> "auto"' in error_line(refused.stderr, alone=False)
    assert (tmp_path / "out.jsonl").read_bytes() == before
    fresh = ptp(*args[:-3], "--config", "auto.yaml", home=ptp_home, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr.decode()
    assert [r["settings"]["alpha"] for r in parse_rows(fresh.stdout)] == ["auto", "auto"]


def test_eval_grid_takes_auto_as_its_base(tmp_path: Path, ptp_home: Path):
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "img.png")
    write_jsonl(tmp_path / "gold.jsonl", [
        {"id": "a", "image": "img.png", "question": "Is it red?", "answer": "yes"},
        {"id": "b", "image": "img.png", "question": "What colour?", "answer": "red"},
    ])
    result = ptp("eval", "gold.jsonl", "--model", "tiny", "--methods", "ptp,none", "--ratios", "0.5", "--alpha", "auto",
                 "--max-new-tokens", "2", "--max-tiles", "1", "--out-dir", "runs", home=ptp_home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    rows = parse_rows((tmp_path / "runs" / "ptp@0.5.jsonl").read_bytes())
    assert [r["settings"]["alpha"] for r in rows] == ["auto", "auto"]
    assert all(0.0 <= r["pruning"]["alpha"] <= 1.0 for r in rows)
    assert all("pruning" not in r for r in parse_rows((tmp_path / "runs" / "none.jsonl").read_bytes()))
