"""Shared test fixtures. Real data lives beside the repository in ../shared/data (never copied in)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own decoded-image cache, so tests never share or pollute ~/.cache."""
    monkeypatch.setenv("HISTOSSL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data expected at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA
