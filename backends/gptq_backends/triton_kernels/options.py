"""The triton backend's options: typed, parsed once by the core, carried by each prepared weight.

Set them at load (``from_quantized(..., backend_options={"triton": {"autotune": False}})``) or
on the command line (``--backend-option triton.autotune=off``); each has one environment
fallback for deployments, read by the core's one parser (docs/DESIGN.md §12).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptq_core.options import BackendOptions, option

#: Where tuned tables are written and read when ``cache_dir`` is not set.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gptq_core" / "triton"


@dataclass(frozen=True)
class TritonOptions(BackendOptions):
    """How the triton backend picks its launch configurations (see ``configs``)."""

    autotune: bool = option(
        True,
        "time the candidate tiles at the first call of a batch-size bucket that no tuned table "
        "holds (on a GPU, never during CUDA-graph capture) and remember the fastest",
        env="GPTQ_TRITON_AUTOTUNE",
    )
    shipped_configs: bool = option(
        True,
        "use the tuned tables shipped in the package (tuned/<GPU name>.json); off: only the "
        "user's tuned tables, autotuning and the default rules (to re-tune every key)",
        env="GPTQ_TRITON_SHIPPED",
    )
    cache_dir: Path | None = option(
        None,
        "folder of the user's tuned tables (default ~/.cache/gptq_core/triton)",
        env="GPTQ_TRITON_CACHE_DIR",
    )

    @property
    def tuned_dir(self) -> Path:
        """The folder the user's tuned tables live in."""
        return self.cache_dir if self.cache_dir is not None else DEFAULT_CACHE_DIR
