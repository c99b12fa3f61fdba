"""SASS helpers for the compile tests (cuobjdump text -> kernels, main-loop instruction mix).

``hot_path`` walks one iteration of gemm_kernel's main loop (one k stage) as the SASS lays it
out: from the loop head (the ``DEPBAR.LE SB0`` of cp_async_wait) to the branch that skips the
block-tile end (the ``continue``), then from that branch's target to the back edge. The rarely
taken fetch branch (a new column) stays in.
"""

from __future__ import annotations

import collections
import re

from gptq_core.sass import opcode


#: gemm_kernel<BITS, T, M_BLOCKS, HAS_ZEROS, KIND> as mangled by nvcc.
_GEMM = re.compile(r"gemm_kernelILi(\d)E(\w+?)Li(\d)ELb(\d)ELi(\d)EE")


def gemm_id(name: str) -> tuple[int, str, int, bool, int] | None:
    """(bits, dtype, row blocks, zero points, kind) of a gemm kernel's mangled name, else None."""
    m = _GEMM.search(name)
    if m is None:
        return None
    return int(m.group(1)), "bf16" if "bfloat16" in m.group(2) else "f16", int(m.group(3)), m.group(4) == "1", int(m.group(5))


def _target(text: str) -> int | None:
    m = re.search(r"BRA (?:!?U?P\d, )?(0x[0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def hot_path(ins: list[tuple[int, str]]) -> collections.Counter:
    """Opcode counts of one main-loop stage."""
    head = next(a for a, t in ins if t.startswith("DEPBAR.LE SB0"))
    back = next(a for a, t in ins if a > head and (b := _target(t)) is not None and head - 0x400 < b <= head)
    hmma = [a for a, t in ins if "HMMA" in t and head < a < back]
    cont = next((a, _target(t)) for a, t in ins
                if a > hmma[-1] and (b := _target(t)) is not None and back - 0x400 < b < back)
    hot = collections.Counter()
    for a, t in ins:
        if head <= a <= cont[0] or cont[1] <= a <= back:
            hot[opcode(t)] += 1
    return hot
