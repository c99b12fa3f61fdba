"""Shared fixtures of the cuda backend's tests."""

from __future__ import annotations

import pytest

from gptq_core.threads import single_thread


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Small matrices: one torch thread is fastest, and two pytest workers do not oversubscribe."""
    with single_thread():
        yield
