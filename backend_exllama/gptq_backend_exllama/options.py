"""The exllama backend's options (docs/DESIGN.md §12): set at load, parsed once, never read per call.

    from_quantized(path, backend_options={"exllama": {"build_dir": "/opt/ext"}})
    gptq generate ... --backend-option exllama.dequant_threshold=16

No environment fallbacks: every setting is a typed field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptq_core.options import BackendOptions, OptionsError, option

#: The largest ``dequant_threshold``: the split-K workspace holds this many rows per device,
#: and the CUDA-core kernel is far slower than cuBLAS long before it (policy.py).
MAX_KERNEL_M = 256


@dataclass(frozen=True)
class ExllamaOptions(BackendOptions):
    """Typed settings of the exllama backend; see the README's options table."""

    build_dir: Path | None = option(
        None, "folder of the compiled extension (default: a cache folder per torch, CUDA, "
        "architectures and source hash)")
    archs: str | None = option(
        None, 'compute capabilities to build for, e.g. "7.5;8.6" (default: the GPUs present)')
    dequant_threshold: int | None = option(
        None, f"rows above which a call dequantizes the layer and calls cuBLAS (0..{MAX_KERNEL_M}; "
        "default: the policy table by activation dtype)")

    def __post_init__(self) -> None:
        if self.dequant_threshold is not None and not 0 <= self.dequant_threshold <= MAX_KERNEL_M:
            raise OptionsError(
                f"exllama option dequant_threshold={self.dequant_threshold} must be in "
                f"0..{MAX_KERNEL_M}; leave it unset for the policy table")
        if self.archs is not None:
            from .build import BuildError, parse_archs  # noqa: PLC0415 (build imports torch's builder lazily)

            try:
                parse_archs(self.archs)
            except BuildError as exc:
                raise OptionsError(f"exllama option archs: {exc}") from None
