"""The rocm backend's options (docs/DESIGN.md §12): set at load, parsed once, never read per call.

    from_quantized(path, backend_options={"rocm": {"archs": "gfx90a;gfx942"}})
    gptq generate ... --backend-option rocm.dequant_threshold=16

No environment fallbacks: every setting is a typed field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptq_backend_exllama.options import MAX_KERNEL_M, ExllamaOptions
from gptq_core.options import BackendOptions, OptionsError, option

from .probe import SUPPORTED_ARCHS


def parse_archs(text: str) -> list[str]:
    """"gfx90a;gfx942" (or "gfx90a,gfx942") -> ["gfx90a", "gfx942"], each one that the
    kernels are built for; raises OptionsError on anything else."""
    archs = sorted({a.strip().split(":")[0] for a in text.replace(",", ";").split(";") if a.strip()})
    bad = [a for a in archs if a not in SUPPORTED_ARCHS]
    if bad or not archs:
        raise OptionsError(f"rocm option archs={text!r}: {', '.join(bad) or 'no architecture'} is not "
                           f"one the kernels are built for; use some of {', '.join(SUPPORTED_ARCHS)}")
    return archs


@dataclass(frozen=True)
class RocmOptions(BackendOptions):
    """Typed settings of the rocm backend; see the README's options table."""

    build_dir: Path | None = option(
        None, "folder of the hipified sources and the compiled extension (default: a cache folder "
        "per torch, HIP version, architectures and source hash)")
    archs: str | None = option(
        None, 'gfx architectures to build for, e.g. "gfx90a;gfx942" (default: the GPUs present)')
    dequant_threshold: int | None = option(
        None, f"rows above which a call dequantizes the layer and multiplies with hipBLAS "
        f"(0..{MAX_KERNEL_M}; default: the exllama backend's table by activation dtype)")

    def __post_init__(self) -> None:
        if self.archs is not None:
            parse_archs(self.archs)
        self.exllama()  # the same range check as the exllama backend's

    def exllama(self) -> ExllamaOptions:
        """The settings gptq_backend_exllama.prepare reads (the dispatch threshold)."""
        try:
            return ExllamaOptions(dequant_threshold=self.dequant_threshold)
        except OptionsError as exc:
            raise OptionsError(str(exc).replace("exllama option", "rocm option")) from None
