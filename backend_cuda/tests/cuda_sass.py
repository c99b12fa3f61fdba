"""SASS helpers for the compile tests (cuobjdump text -> kernels, decode-kernel instruction mix).

``hot_step`` counts the instructions of one step of the decode kernel's main loop as the SASS
lays it out: the straight-line code between two consecutive HMMAs of the same row tile, cold
group-fold branches excluded (they run once per group, not per step).
"""

from __future__ import annotations

import collections
import re

from gptq_core.sass import opcode


#: gemv_kernel<BITS, DT, MT, ZEROS, ALIGNED> as mangled by nvcc.
_GEMV = re.compile(r"gemv_kernelILi(\d)ELi(\d)ELi(\d)ELb(\d)ELb(\d)EE")


def gemv_id(name: str) -> tuple[int, str, int, bool, bool] | None:
    """(bits, dtype, row tiles, zero points, unit-aligned groups) of a decode kernel's mangled
    name, else None."""
    m = _GEMV.search(name)
    if m is None:
        return None
    return (int(m.group(1)), "bf16" if m.group(2) == "1" else "f16", int(m.group(3)), m.group(4) == "1",
            m.group(5) == "1")


def hot_step(ins: list[tuple[int, str]], mma_per_step: int) -> tuple[collections.Counter, int]:
    """(opcode counts, steps) of the unrolled main loop: from the first HMMA to the last, without
    the blocks a forward conditional branch skips that hold no HMMA (the group folds, taken once
    per group; a skipped unit holds HMMAs and stays in). Divide by the steps for a per-step mix."""
    hmma = [i for i, (_, t) in enumerate(ins) if "HMMA" in t]
    first, last = hmma[0], hmma[-1]
    addr = [a for a, _ in ins]
    counts: collections.Counter = collections.Counter()
    i = first
    while i <= last:
        text = ins[i][1]
        counts[opcode(text)] += 1
        m = re.match(r"@!?P\d+ BRA (0x[0-9a-f]+)", text)
        if m:
            target = int(m.group(1), 16)
            j = i + 1
            while j <= last and addr[j] < target:
                j += 1
            if addr[i] < target <= addr[last] and not any("HMMA" in ins[k][1] for k in range(i + 1, j)):
                i = j
                continue
        i += 1
    return counts, counts["HMMA"] // mma_per_step
