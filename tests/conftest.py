"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ptp_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PTP_HOME for the whole session, with the tiny model built once (pass it to subprocesses)."""
    from ptp_cli.builders.tiny import ensure_tiny

    home = tmp_path_factory.mktemp("ptp_home")
    ensure_tiny(cache_dir=home / "models")
    return home


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BPE tokenizer's files, built once for the session (tests only read them)."""
    from ptp_cli.builders.bpe import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(d)
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
