"""Shared fixtures of the core's tests."""

from __future__ import annotations

import pytest

from gptq_core.threads import single_thread


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny matrices: one torch thread is fastest, and two pytest workers (CI's two cores) do
    not oversubscribe."""
    with single_thread():
        yield
