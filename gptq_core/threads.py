"""CPU threading for work too small to share between threads.

Small models (stories260K's matrices are 64 x 172) lose more to thread start-up and, on a busy
machine, to OpenMP threads spinning against each other than they gain from a second core:
``gptq demo`` measured about 10x slower with 2 threads than with one on a loaded 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block; the previous count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
