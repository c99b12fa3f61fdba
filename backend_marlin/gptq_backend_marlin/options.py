"""The marlin backend's options (docs/DESIGN.md §12): set at load, parsed once, never read per call.

    from_quantized(path, backend_options={"marlin": {"dense_cache_mb": 512}})
    gptq generate ... --backend-option marlin.dequant_threshold=128

Only the two build settings have an environment fallback (for images that build ahead of time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptq_core.options import BackendOptions, OptionsError, option

#: The largest ``dequant_threshold``: above it the kernel would need more stream-K counters and
#: slots than the shared workspace holds, and it is several times slower than cuBLAS there
#: (NOTES/perf-marlin.md, "Where it stands": 8192x28672 at M=4096, 2710 us against fp16's).
MAX_KERNEL_M = 4096


@dataclass(frozen=True)
class MarlinOptions(BackendOptions):
    """Typed settings of the marlin backend; see the README's options table."""

    build_dir: Path | None = option(
        None, "folder of the compiled extension (default: a cache folder per torch, CUDA, "
        "architectures and source hash)", env="GPTQ_MARLIN_BUILD_DIR")
    archs: str | None = option(
        None, 'compute capabilities to build for, e.g. "8.0;9.0" (default: the GPUs present)',
        env="GPTQ_MARLIN_ARCHS")
    dense_cache_mb: float = option(
        0.0, "memory (MiB, per process) for dense copies of layers, which cuBLAS serves above "
        "dense_threshold rows; 0 keeps only the quantized weights")
    dequant_threshold: int | None = option(
        None, f"rows above which a call dequantizes the layer and calls cuBLAS (0..{MAX_KERNEL_M}; "
        "default: the measured table by layer size)")
    dense_threshold: int | None = option(
        None, "rows above which a layer with a dense copy uses it (default: the measured table)")
    hopper_cache_mb: float = option(
        0.0, "memory (MiB, per process) for a second copy of 4-bit layers in the layout of the "
        "sm_90a wgmma kernel, which serves the rows above hopper_threshold up to hopper_max_rows "
        "on H100/H200 (a copy is the layer's 4-bit size: 3.2 GiB for Llama-2-7B); 0 keeps none")
    hopper_threshold: int | None = option(
        None, "rows above which a layer's Hopper copy serves (default: the measured table by layer "
        "size, 8 to 32; 0 sends every kernel call up to hopper_max_rows to it)")
    hopper_max_rows: int | None = option(
        None, "the most rows a layer's Hopper copy serves (default: the measured table by layer "
        "size, 160 or 256; never above a chosen dequant_threshold or a dense copy's threshold)")

    def __post_init__(self) -> None:
        if self.dense_cache_mb < 0:
            raise OptionsError(f"marlin option dense_cache_mb={self.dense_cache_mb} must be >= 0 (MiB)")
        if self.dequant_threshold is not None and not 0 <= self.dequant_threshold <= MAX_KERNEL_M:
            raise OptionsError(
                f"marlin option dequant_threshold={self.dequant_threshold} must be in "
                f"0..{MAX_KERNEL_M}; leave it unset for the measured table")
        if self.dense_threshold is not None and self.dense_threshold < 0:
            raise OptionsError(f"marlin option dense_threshold={self.dense_threshold} must be >= 0")
        if self.hopper_cache_mb < 0:
            raise OptionsError(f"marlin option hopper_cache_mb={self.hopper_cache_mb} must be >= 0 (MiB)")
        for name in ("hopper_threshold", "hopper_max_rows"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_KERNEL_M:
                raise OptionsError(f"marlin option {name}={value} must be in 0..{MAX_KERNEL_M}; "
                                   "leave it unset for the measured table")
        if self.archs is not None:
            from .build import BuildError, parse_archs  # noqa: PLC0415 (build imports torch's builder lazily)

            try:
                parse_archs(self.archs)
            except BuildError as exc:
                raise OptionsError(f"marlin option archs: {exc}") from None
