"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, architectures, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) for the compute
capabilities of the GPUs present, once per cache key, then loads it so that
``torch.ops.gptq_exllama.*`` run on CUDA. Any failure (no CUDA build of torch, no nvcc, no
ninja, an architecture the toolkit cannot build, a compiler error) is raised as
:class:`BuildError` with the reason, and remembered, so the probe reports it and the selector
falls back to the next backend. The machinery is :class:`gptq_core.jit.Extension`; this module
declares the extension and its architectures.

Which GPUs can be built for is the toolkit's answer, not a table here: ``nvcc
--list-gpu-arch`` (CUDA 13.0 lists compute_75 and newer; CUDA 12 still lists compute_60 and
compute_70). The kernels themselves need compute capability 6.0 (fp16 ``fma.rn.f16x2``). A
GPU newer than every listed architecture gets PTX of the newest one, compiled by the driver.

Build ahead of time (e.g. in a container image) with::

    python -m gptq_backend_exllama.build            # for the GPUs present
    python -m gptq_backend_exllama.build --arch 7.5 # without a GPU

The options ``build_dir`` and ``archs`` (:class:`~.options.ExllamaOptions`) override the cache
folder (default ``$XDG_CACHE_HOME/gptq-backend-exllama/<key>``, i.e. ``~/.cache/...``) and the
architectures; the command line takes them as ``--build-dir`` and ``--arch``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptq_core import jit

from . import ops  # noqa: F401  (the schemas must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_exllama_ext"
MIN_ARCH = (6, 0)  # fma.rn.f16x2 and the fp16 conversions the kernels use

Arch = tuple[int, int]


class BuildError(jit.BuildError):
    """The extension could not be built or loaded; the message says why and what to do."""


EXTENSION = jit.Extension(
    name=EXTENSION_NAME, csrc=CSRC, cache_name="gptq-backend-exllama", what="the exllama CUDA extension",
    shared_headers=True, python_module=False, error=BuildError,
)

#: the extension's own answers, under the names plugins, tests and scripts use
sources = EXTENSION.sources
source_hash = EXTENSION.source_hash
toolchain_problems = EXTENSION.toolchain_problems
failure = EXTENSION.failure


def parse_archs(text: str) -> list[Arch]:
    """"7.5;9.0" (or "75,90") -> [(7, 5), (9, 0)]; raises BuildError on anything else."""
    return jit.parse_archs(text, "7.5 or 9.0", BuildError)


def nvcc_path() -> str | None:
    """nvcc on PATH, else under CUDA_HOME as torch's builder finds it."""
    return jit.nvcc_path()


def toolkit_archs(nvcc: str | None = None) -> tuple[Arch, ...]:
    """Compute capabilities the CUDA toolkit can build for (``nvcc --list-gpu-arch``); empty
    when there is no nvcc or it does not answer."""
    return jit.nvcc_arch_list(nvcc)


def arch_problem(arch: Arch, available: tuple[Arch, ...]) -> str | None:
    """Why the kernels cannot be built for ``arch`` with a toolkit that lists ``available``."""
    have = ".".join(map(str, arch))
    if arch < MIN_ARCH:
        return f"the exllama kernels need compute capability >= 6.0, this GPU has {have}"
    if available and arch < available[0]:
        oldest = ".".join(map(str, available[0]))
        return (f"the installed CUDA toolkit builds for compute capability >= {oldest} only "
                f"(nvcc --list-gpu-arch), this GPU has {have}; install a CUDA 12.x toolkit "
                "(CUDA 13 dropped sm_60 and sm_70) or use another backend")
    return None


def arch_flags(archs: list[Arch], available: tuple[Arch, ...] = ()) -> list[str]:
    """One -gencode per architecture: machine code where the toolkit lists it, else PTX of the
    newest listed architecture below it (the driver compiles it for the GPU)."""
    flags = []
    for a, b in archs:
        if not available or (a, b) in available:
            flags.append(f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}")
        else:
            base = max((x for x in available if x <= (a, b)), default=available[0])
            flags.append(f"-gencode=arch=compute_{base[0]}{base[1]},code=compute_{base[0]}{base[1]}")
    return sorted(set(flags))


def present_archs() -> list[Arch]:
    """Compute capabilities of the visible GPUs."""
    return jit.present_archs()


def build_dir(archs: list[Arch], folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    return EXTENSION.build_dir(jit.cuda_key(archs), folder)


def load(archs: str | list[Arch] | None = None, folder: Path | None = None, verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    ``archs`` ("7.5;9.0" or a list; default: the GPUs present) and ``folder`` come from the
    options. The extension loads once per process: later calls return at once, whatever they
    ask for; a failure is remembered likewise and raised again at once.
    """
    def target() -> jit.Target:
        chosen = parse_archs(archs) if isinstance(archs, str) else archs
        chosen = present_archs() if chosen is None else list(chosen)
        if not chosen:
            raise BuildError("no CUDA GPU to build for; pass --arch 7.5 (option archs) to build ahead of time")
        available = toolkit_archs()
        bad = [p for a in chosen if (p := arch_problem(a, available))]
        if bad:
            raise BuildError("; ".join(bad))
        return jit.Target(jit.cuda_key(chosen), tuple(arch_flags(chosen, available)))

    return EXTENSION.load(target, folder, verbose)


def main(argv: list[str] | None = None) -> int:
    def build(args: argparse.Namespace) -> tuple[str, Path]:
        from .options import ExllamaOptions  # noqa: PLC0415

        options = ExllamaOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                        if v is not None}, "exllama")
        folder = load(options.archs, options.build_dir, verbose=args.verbose)
        return f"gptq_exllama for {options.archs or present_archs()}", folder

    return EXTENSION.main(
        argv, build, prog="python -m gptq_backend_exllama.build",
        description="Compile the exllama CUDA extension ahead of time into its cache folder.",
        arch_help='compute capabilities, e.g. "7.5;8.6" (default: the GPUs present)',
        build_dir_help="where to build (default: the cache folder)",
    )


if __name__ == "__main__":
    sys.exit(main())
