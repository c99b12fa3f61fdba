"""The cpu backend's options (docs/DESIGN.md §12): set at load, parsed once, never read per call.

    from_quantized(path, device="cpu", backend_options={"cpu": {"build_dir": "/opt/gptq-cpu"}})
    gptq generate ... --backend-option cpu.build_dir=/opt/gptq-cpu

Only the build folder has an environment fallback (for images that build ahead of time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptq_core.options import BackendOptions, OptionsError, option


@dataclass(frozen=True)
class CpuOptions(BackendOptions):
    """Typed settings of the cpu backend; see backends/README.md."""

    build_dir: Path | None = option(
        None, "folder of the compiled C++ kernels (default: a cache folder per torch version, "
        "compiler and source hash under $XDG_CACHE_HOME)", env="GPTQ_CPU_BUILD_DIR")
    gemm_threshold: int | None = option(
        None, "rows above which the blocked GEMM path serves instead of the register GEMV "
        "(default: the measured value, policy.GEMM_ABOVE_M)")

    def __post_init__(self) -> None:
        if self.gemm_threshold is not None and self.gemm_threshold < 0:
            raise OptionsError(
                f"cpu option gemm_threshold={self.gemm_threshold} must be >= 0; leave it unset "
                "for the measured value")
