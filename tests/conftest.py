"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ptp_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PTP_HOME for the whole session, with the tiny model built once (pass it to subprocesses)."""
    from ptp_cli.tiny import ensure_tiny

    home = tmp_path_factory.mktemp("ptp_home")
    ensure_tiny(cache_dir=home / "models")
    return home
