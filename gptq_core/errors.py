"""The library's exceptions: every one names what was wrong and what to do about it."""

from __future__ import annotations

import warnings


class GPTQError(Exception):
    """Base class of every error gptq-core raises on purpose."""


class FormatError(GPTQError, ValueError):
    """A packed weight or checkpoint does not match the GPTQ format it claims to be."""


class NotSupportedError(GPTQError, ValueError):
    """A backend was asked for something it declared it cannot do.

    ``reasons`` holds the human-readable reasons, one per failed requirement.
    """

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons or [])


class NoBackendError(GPTQError, RuntimeError):
    """No installed backend can serve a layer; the message lists every backend's reasons."""


class BackendConflictError(GPTQError, RuntimeError):
    """Two installed distributions register a backend under the same name."""


class CheckpointError(FormatError):
    """A checkpoint folder is missing files or tensors, or contradicts its own config."""


class CalibrationError(GPTQError, ValueError):
    """The calibration set is empty, too short or not of a supported kind."""


_warned: set[str] = set()


def warn_once(message: str, category: type[Warning] = RuntimeWarning, stacklevel: int = 3) -> None:
    """Warn with ``message`` once per process: a load that goes on without what an option or a
    build promised says so one time, not once per layer."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, category, stacklevel=stacklevel)
