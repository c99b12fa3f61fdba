"""The whole gptq-conformance suite against the example backend: this is all it takes."""

from gptq_conformance import BackendConformance


class TestExampleConformance(BackendConformance):
    backend = "example"
