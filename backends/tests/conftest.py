"""Shared fixtures of the portable backends' tests."""

from __future__ import annotations

import os

import pytest
import torch

#: Whether the triton kernels run on a GPU here (else under Triton's interpreter).
_ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.fixture(scope="module")
def triton_interpreter():
    """Without a GPU, run the kernels under Triton's interpreter (only while the module using
    this runs; the kernels module is imported lazily, inside the first test)."""
    if _ON_GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield
