"""Shared by the op tests."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Every test starts from the automatic backend choice, whatever the caller's environment says."""
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
