"""The portable backends every gptq-core install gets: ``torch`` (reference) and ``triton``."""

__version__ = "0.1.0"
