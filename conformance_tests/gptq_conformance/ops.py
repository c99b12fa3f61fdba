"""Finding the custom ops a backend's ``qmatmul`` dispatches, so each can be opchecked.

A ``TorchDispatchMode`` sees every operator call below autograd; the ones outside the ATen /
prims namespaces are the backend's ``torch.library`` custom ops (their implementations run
with the mode popped, so only the top-level custom ops are recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BUILTIN_NAMESPACES = frozenset({"aten", "prim", "prims", "_c10d_functional", "c10d"})


@dataclass
class OpCall:
    """One recorded call: the op overload and clones of its arguments."""

    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.op)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_(value.requires_grad) if copy.is_floating_point() else copy
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def without_grad(value: Any) -> Any:
    """``value`` (an argument, or a tuple/list/dict of them) with every tensor detached."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(without_grad(v) for v in value)
    if isinstance(value, dict):
        return {k: without_grad(v) for k, v in value.items()}
    return value


class CustomOpRecorder(TorchDispatchMode):
    """Records the first call of each non-builtin op made while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, OpCall] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in BUILTIN_NAMESPACES and str(func) not in self.calls:
            self.calls[str(func)] = OpCall(func, _clone(args), _clone(kwargs))
        return func(*args, **kwargs)


#: opcheck's checks other than the schema's mutation check (torch.library.opcheck's defaults)
NON_SCHEMA_CHECKS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_with_scratch(op: torch._ops.OpOverload, args: tuple, kwargs: dict, scratch: tuple[str, ...]) -> None:
    """opcheck for an op with declared scratch arguments (a workspace whose contents mean
    nothing between calls, declared unmutated so functionalization never copies it): one call
    must leave every other tensor argument unchanged, then opcheck runs its other checks.
    Raises AssertionError naming a mutated argument or a declared name the schema lacks."""
    names = [a.name for a in op._schema.arguments]
    unknown = sorted(set(scratch) - set(names))
    if unknown:
        raise AssertionError(f"{op._schema.name} declares scratch argument(s) {unknown} its schema "
                             f"does not have (arguments: {', '.join(names)})")
    bound = dict(zip(names, args)) | kwargs
    watched = {n: v.detach().clone() for n, v in bound.items() if isinstance(v, torch.Tensor) and n not in scratch}
    op(*args, **kwargs)
    for name, before in watched.items():
        after = bound[name].detach()
        if not torch.equal(torch.nan_to_num(before), torch.nan_to_num(after)):
            raise AssertionError(f"{op._schema.name} mutated argument '{name}', which its schema "
                                 "declares unmutated and the backend does not declare scratch")
    torch.library.opcheck(op, args, kwargs, test_utils=NON_SCHEMA_CHECKS)
