"""Whether a backend call runs plainly eager, so it may skip the torch dispatcher.

Backends keep two entry points to one kernel (docs/DESIGN.md §11): a ``torch.library`` custom op,
which torch.compile traces and dispatch modes (fake tensors, the conformance suite's op
recorder) see, and a direct launch that costs a few microseconds less per call. The direct one
is taken only when nothing could be tracing or recording the call: not under torch.compile, no
dispatch mode, and no profiler (a kernel launched from a pybind entry is not attributed to the
module range around it, so a decode-step breakdown would count marlin's linears as "other").
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _dispatch_modes() -> int:
    return 1 if _get_current_dispatch_mode() is not None else 0


#: The number of active TorchDispatchModes; torch's C++ counter where this torch has it.
_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", _dispatch_modes)


_profiling = torch._C._autograd._profiler_enabled


def plain_eager() -> bool:
    """True when not traced by torch.compile, no dispatch mode is active and no profiler records."""
    return not torch.compiler.is_compiling() and _dispatch_depth() == 0 and not _profiling()
