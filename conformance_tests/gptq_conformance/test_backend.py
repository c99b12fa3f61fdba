"""The suite as collected by ``pytest --pyargs gptq_conformance --gptq-backend=NAME``."""

from gptq_conformance.suite import BackendConformance


class TestBackend(BackendConformance):
    """The backend named by --gptq-backend, with the declarations of its plugin module."""
