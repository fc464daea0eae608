"""The checkpoint guard both training stages share: a run resumes only under the settings it was started with."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from training.runs import load_state, lr_at, save_state


@dataclass
class Cfg:
    seed: int = 1
    lr: float = 0.001
    checkpoint_minutes: float = 5.0
    new_guide: float = 0.0  # stands for an option added after a checkpoint was written


def _write(path: Path, config: dict) -> None:
    save_state(path, {"config": config, "step": 7})


def test_same_settings_resume_and_schedule_fields_may_differ(tmp_path: Path):
    path = tmp_path / "train_state.pt"
    _write(path, asdict(Cfg()))
    assert load_state(path, Cfg(checkpoint_minutes=1.0), ("checkpoint_minutes",))["step"] == 7
    assert load_state(tmp_path / "none.pt", Cfg(), ()) is None


def test_other_settings_are_refused(tmp_path: Path):
    path = tmp_path / "train_state.pt"
    _write(path, asdict(Cfg()))
    with pytest.raises(ValueError, match="other settings"):
        load_state(path, Cfg(lr=0.002), ("checkpoint_minutes",))
    with pytest.raises(ValueError, match="other settings"):
        load_state(path, Cfg(checkpoint_minutes=1.0), ())


def test_an_option_added_later_counts_as_its_default(tmp_path: Path):
    path = tmp_path / "train_state.pt"
    old = {k: v for k, v in asdict(Cfg()).items() if k != "new_guide"}
    _write(path, old)
    assert load_state(path, Cfg(), ())["step"] == 7
    # turning the new option on is a different run from the one in the checkpoint
    with pytest.raises(ValueError, match="other settings"):
        load_state(path, Cfg(new_guide=1.0), ())


def test_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(1.0, 10, 100, 0) == pytest.approx(0.1)
    assert lr_at(1.0, 10, 100, 9) == pytest.approx(1.0)
    assert lr_at(1.0, 10, 100, 100) == pytest.approx(0.1)
    values = [lr_at(1.0, 10, 100, s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
