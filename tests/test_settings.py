"""The settings table: one declaration per setting, everything else derived from it, each value checked once."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ptp_cli import settings as declared
from ptp_cli.cli.main import app
from ptp_cli.errors import UsageError
from ptp_cli.pruning import PruneConfig
from ptp_cli.run_config import RunConfig
from ptp_cli.settings import SETTINGS, markdown_table, names_for

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_table_is_generated_from_the_declarations() -> None:
    # Regenerate with: python -m ptp_cli.settings > docs/settings.md
    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == markdown_table()


def test_config_fields_and_declarations_agree() -> None:
    """Every config field a user can set has one declaration, and takes its default from it."""
    for config, target in ((RunConfig(), "run"), (PruneConfig(), "prune")):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "prune"}
        declared_fields = {s.field_name: s for s in SETTINGS.values() if s.target == target}
        assert set(fields) == set(declared_fields), target
        for name, value in fields.items():
            assert value == declared_fields[name].default, name


def test_commands_take_the_options_their_declarations_name() -> None:
    import typer.main

    command = typer.main.get_command(app)
    for name in ("infer", "eval"):
        params = {p.name for p in command.commands[name].params}  # type: ignore[attr-defined]
        assert set(names_for(name)) <= params, name
        assert not (set(SETTINGS) - set(names_for(name))) & params, name  # and none it does not declare
    # The bare option list of infer is the table's: every setting takes an env variable and a help text.
    for param in command.commands["infer"].params:  # type: ignore[attr-defined]
        if param.name in SETTINGS:
            assert param.envvar == SETTINGS[param.name].env and param.help


def test_a_bad_value_names_its_option_whatever_builds_the_config() -> None:
    with pytest.raises(UsageError, match=r"--ratio must be in \[0, 1\), got 1.5"):
        PruneConfig(ratio=1.5)
    with pytest.raises(UsageError, match="--batch-size must be at least 1"):
        RunConfig(batch_size=0)
    with pytest.raises(UsageError, match="--temperature must be a finite number"):
        RunConfig(temperature=float("nan"))
    with pytest.raises(UsageError, match="--method must be one of"):
        dataclasses.replace(PruneConfig(), method="bogus")


def test_an_infer_run_checks_each_value_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ptp_home: Path) -> None:
    """One call path, one check per value: the range check of each setting and the model-depth check."""
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"id": i, "image": "a.png", "question": "what?"}) + "\n" for i in range(3)))
    checked: Counter[str] = Counter()
    layers: list[str] = []
    check_value, check_layers = declared.check_value, PruneConfig.check_layers

    def counting_check(setting: declared.Setting, value: object) -> None:
        checked[setting.name] += 1
        check_value(setting, value)

    def counting_layers(self: PruneConfig, model_cfg: object) -> PruneConfig:
        layers.append(self.method)
        return check_layers(self, model_cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(declared, "check_value", counting_check)
    monkeypatch.setattr(PruneConfig, "check_layers", counting_layers)
    monkeypatch.setenv("PTP_HOME", str(ptp_home))
    monkeypatch.setenv("PTP_BATCH_SIZE", "2")
    args = ["infer", str(tmp_path / "q.jsonl"), "--model", "tiny", "--ratio", "0.25", "--max-new-tokens", "2",
            "-o", str(tmp_path / "out.jsonl"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["settings"]["ratio"] == 0.25
    assert checked["ratio"] == 1 and checked["batch_size"] == 1 and checked["max_new_tokens"] == 1
    assert max(checked.values()) == 1, checked  # every value, given or default, checked exactly once
    assert set(checked) >= {s.name for s in SETTINGS.values() if s.target in ("run", "prune")}
    assert layers == ["ptp"]  # the model-depth check: once, before the weights load


def test_positions_default_to_the_engines_and_an_explicit_original_is_refused_under_vllm() -> None:
    """Python callers get what the CLI gets: vLLM numbers prompt embeddings 0..n-1, so its default is contiguous;
    ptp's own engine keeps original positions; asking vLLM for original ones is said plainly."""
    from ptp_cli.run_config import check_against_model, read_model_config

    assert PruneConfig().positions is None and PruneConfig().position_mode == "original"
    assert RunConfig(model="tiny").prune.positions == "original"
    vllm = RunConfig(model="tiny", engine="vllm", prune=PruneConfig(method="ptp", ratio=0.5))
    assert vllm.prune.positions == "contiguous" and vllm.prune.ratio == 0.5
    _, cfg = read_model_config(vllm)
    check_against_model(vllm, cfg)
    explicit = RunConfig(model="tiny", engine="vllm", prune=PruneConfig(method="ptp", positions="original"))
    with pytest.raises(UsageError, match="--positions original needs explicit RoPE positions"):
        check_against_model(explicit, cfg)
