"""Just-in-time build of the exllama kernels for AMD GPUs, through gptq_core.jit.

``load()`` copies the CUDA sources gptq-backend-exllama ships into a staging folder, hipifies
them there (:func:`.hip_build.hipify_into`) and hands the hipified units to
:class:`gptq_core.jit.Extension`, whose ``torch.utils.cpp_extension.load`` compiles them with
hipcc on a ROCm torch (its own hipify pass skips files marked as hipify output), once per cache
key (torch, HIP version, gfx architectures, hash of the hipified sources), then loads the
library so that ``torch.ops.gptq_exllama.*`` (schemas: ``gptq_backend_exllama.ops``) run on the
AMD GPU. Failures are :class:`BuildError` with the reason, remembered for the probe, as for the
CUDA backends (docs/DESIGN.md §3, §10).

Build ahead of time (e.g. in a container image) with::

    python -m gptq_backend_rocm.build                     # for the GPUs present
    python -m gptq_backend_rocm.build --arch gfx90a;gfx942  # named architectures, no GPU needed
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptq_backend_exllama import build as exllama_build
from gptq_backend_exllama import ops  # noqa: F401  (the schemas must exist before the library registers kernels)
from gptq_core import jit

from . import hip_build, probe

EXTENSION_NAME = "gptq_exllama_hip_ext"
CACHE_NAME = "gptq-backend-rocm"


class BuildError(jit.BuildError):
    """The HIP extension could not be built or loaded; the message says why and what to do."""


class _Stage:
    """Where the hipified sources of this process's build are (set by :func:`stage`)."""

    folder: Path | None = None


@dataclass(frozen=True)
class HipExtension(jit.Extension):
    """A :class:`gptq_core.jit.Extension` compiled by hipcc from hipified copies of another
    distribution's sources: the toolchain is a ROCm torch and hipcc, and the sources, include
    path and source hash are those of the staging folder once :func:`stage` has filled it."""

    stage: _Stage = field(default_factory=_Stage, compare=False, repr=False)

    def toolchain_problems(self) -> list[str]:
        problems = []
        if torch.version.hip is None:
            problems.append(f"this torch build ({torch.__version__}) has no HIP support; install a "
                            "ROCm build of torch (https://pytorch.org/get-started/locally/, ROCm)")
        elif rocm_home() is None:
            problems.append("ROCm not found (no hipcc): install ROCm or set ROCM_HOME")
        if shutil.which("ninja") is None:
            problems.append("ninja not found: pip install ninja")
        return problems

    def _folder(self) -> Path:
        return self.stage.folder if self.stage.folder is not None else self.csrc

    def sources(self) -> list[Path]:
        if self.stage.folder is None:
            return super().sources()
        return sorted(p for p in self.stage.folder.iterdir()
                      if p.suffix == ".hip" or p.name.endswith("_hip.cpp"))

    def include_dirs(self) -> list[Path]:
        return [self._folder(), jit.SHARED_CSRC] if self.shared_headers else [self._folder()]


EXTENSION = HipExtension(
    name=EXTENSION_NAME, csrc=exllama_build.CSRC, cache_name=CACHE_NAME,
    what="the exllama HIP extension", shared_headers=True, python_module=False, error=BuildError,
)

#: the extension's own answers, under the names plugins, tests and scripts use
toolchain_problems = EXTENSION.toolchain_problems
failure = EXTENSION.failure


def rocm_home() -> str | None:
    """ROCm's root as torch's extension builder finds it (None on a CPU or CUDA torch)."""
    from torch.utils import cpp_extension  # noqa: PLC0415 (slow import, first use only)

    return cpp_extension.ROCM_HOME


def stage_folder(folder: Path | None = None) -> Path:
    """Where the hipified sources go: ``folder/hipified`` for a chosen build folder (the
    extension is built in ``folder/build``), else a cache folder named by torch (its hipify
    tables) and the hash of exllama's sources. Never inside the build folder: torch's hipify
    pass rewrites every CUDA file it finds there."""
    if folder is not None:
        return Path(folder).expanduser() / "hipified"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    name = f"hipified-torch{torch.__version__}-{exllama_build.source_hash()}".replace("+", "_")
    return cache / CACHE_NAME / name


def stage(folder: Path | None = None) -> Path:
    """Copy and hipify exllama's sources into the staging folder; the extension reads them there."""
    root = stage_folder(folder)
    units = hip_build.hipify_into("exllama", root)
    if not units:
        raise BuildError(f"hipify produced no translation units from {exllama_build.CSRC}")
    EXTENSION.stage.folder = root / "exllama"
    return EXTENSION.stage.folder


def arch_tag(archs: list[str]) -> str:
    """The cache-key part naming the architectures: "gfx90a_gfx942"."""
    return "_".join(archs) or "none"


def offload_flags(archs: list[str]) -> tuple[str, ...]:
    """One ``--offload-arch`` per architecture (hipcc's spelling of nvcc's -gencode)."""
    return tuple(f"--offload-arch={a}" for a in archs)


def present_archs() -> list[str]:
    """gfx architectures of the visible AMD GPUs (none on a CPU or CUDA torch)."""
    if torch.version.hip is None or not torch.cuda.is_available():
        return []
    return sorted({probe.gfx_arch(i) for i in range(torch.cuda.device_count())})


def load(archs: str | list[str] | None = None, folder: Path | None = None, verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    ``archs`` ("gfx90a;gfx942" or a list; default: the GPUs present) and ``folder`` come from
    the options. The extension loads once per process, like every gptq_core.jit extension."""
    from .options import parse_archs  # noqa: PLC0415 (options imports probe, as this module does)

    def target() -> jit.Target:
        chosen = parse_archs(archs) if isinstance(archs, str) else archs
        chosen = present_archs() if chosen is None else sorted(chosen)
        if not chosen:
            raise BuildError("no AMD GPU to build for; pass --arch gfx90a (option archs) to build "
                             "ahead of time")
        bad = [a for a in chosen if a not in probe.SUPPORTED_ARCHS]
        if bad:
            raise BuildError(f"{', '.join(bad)} is not among the architectures the kernels are built "
                             f"for ({', '.join(probe.SUPPORTED_ARCHS)})")
        stage(folder)
        return jit.Target((f"hip{torch.version.hip}", arch_tag(chosen)), offload_flags(chosen))

    return EXTENSION.load(target, None if folder is None else Path(folder).expanduser() / "build", verbose)


def main(argv: list[str] | None = None) -> int:
    def build(args) -> tuple[str, Path]:
        from .options import RocmOptions  # noqa: PLC0415

        options = RocmOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                     if v is not None}, "rocm")
        built = load(options.archs, options.build_dir, verbose=args.verbose)
        return f"gptq_exllama (HIP) for {options.archs or present_archs()}", built

    return EXTENSION.main(
        argv, build, prog="python -m gptq_backend_rocm.build",
        description="Hipify and compile the exllama kernels for AMD GPUs ahead of time.",
        arch_help='gfx architectures, e.g. "gfx90a;gfx942" (default: the GPUs present)',
        build_dir_help="where to build (default: the cache folder)",
    )


if __name__ == "__main__":
    sys.exit(main())
