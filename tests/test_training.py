"""The training code (``training/``, outside the package): the recipe is the shipped run's, every option has help,
and the installed package holds none of it."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
import setuptools

from ptp_cli.zoo import SHIPPED
from training.pretrain import PretrainConfig
from training.recipe import commands
from training.runs import config_parser, field_help, parse_config
from training.train import TrainConfig

MANIFEST = SHIPPED["mini"] / "ptp_mini.json"


@pytest.mark.skipif(not MANIFEST.is_file(), reason="no trained ptp-mini weights shipped in this build")
def test_the_recipe_is_the_shipped_runs_settings() -> None:
    shipped = json.loads(MANIFEST.read_text(encoding="utf-8"))
    [args] = [args for module, args in commands("runs") if module == "train"]
    out, cfg = parse_config(TrainConfig, args, prog="", doc="", out_help="")
    # A setting added after the run counts as its default there (as when a run resumes).
    assert asdict(cfg) == asdict(TrainConfig()) | shipped["config"]
    assert str(out) == "runs/mini" and "training.recipe" in shipped["trained_by"]


def test_each_stage_starts_from_the_one_before() -> None:
    stages = commands("r")
    outs = [args[args.index("--out") + 1] for _, args in stages if "--out" in args]
    inits = [args[args.index("--init") + 1] for _, args in stages if "--init" in args]
    assert inits == [f"{outs[0]}/vision.pt", f"{outs[1]}/vision.pt"]
    assert stages[-1] == ("ship", [outs[2]])


@pytest.mark.parametrize("config_cls", [TrainConfig, PretrainConfig])
def test_every_option_has_help(config_cls: type) -> None:
    parser = config_parser(config_cls, prog="p", doc="d", out_help="o")
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(helps) == {"out", *asdict(config_cls())}
    assert all(helps.values()), [name for name, text in helps.items() if not text]


def test_help_is_the_fields_comment_continued_below_it() -> None:
    helps = field_help(TrainConfig)
    assert helps["lr"] == "peak AdamW learning rate"
    assert helps["drop_max"].startswith("the share of background tokens dropped")
    assert helps["route_count_head"].endswith("glyph and place)")  # four continuation lines


def test_the_installed_package_holds_no_training_code() -> None:
    root = Path(__file__).resolve().parents[1]
    find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(root, include=find["include"], exclude=find["exclude"])
    assert "ptp_cli.mini" in packages and all(p.split(".")[0] == "ptp_cli" for p in packages), packages
    shipped = {p.name for p in (root / "ptp_cli" / "mini").glob("*.py")}
    assert shipped == {"__init__.py", "model.py"}  # the definition; the weights are package data
