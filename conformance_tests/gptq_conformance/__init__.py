"""gptq-conformance: the shared test suite every gptq-core backend runs against itself.

Run it against an installed backend::

    pytest --pyargs gptq_conformance --gptq-backend=NAME [--gptq-quick] [-n 2]

or subclass :class:`BackendConformance` in your own tests (see the README). The pytest plugin
(:mod:`gptq_conformance.plugin`) is registered through the ``pytest11`` entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BackendConformance", "__version__"]


def __getattr__(name: str):
    # Lazy: the pytest plugin imports this package in every pytest run; torch loads on demand.
    if name == "BackendConformance":
        from .suite import BackendConformance

        return BackendConformance
    raise AttributeError(name)
