"""Shared fixtures. Tests run offline: data comes from GPTFORGE_DATA_DIR (CI sets it to
../shared/data) and every test gets its own empty, writable cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _default_data_dir() -> Path | None:
    env = os.environ.get("GPTFORGE_DATA_DIR")
    if env:
        return Path(env)
    guess = REPO.parent / "shared" / "data"
    return guess if guess.is_dir() else None


DATA_DIR = _default_data_dir()
if DATA_DIR is not None:
    # Make the local copies visible to code under test (and to subprocesses it starts).
    os.environ["GPTFORGE_DATA_DIR"] = str(DATA_DIR)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test writes caches into its own temporary directory, never ~/.cache."""
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA_DIR is None or not (DATA_DIR / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail("set GPTFORGE_DATA_DIR to a directory holding tinyshakespeare/input.txt and gpt2/gpt2.tiktoken")
    return DATA_DIR


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
