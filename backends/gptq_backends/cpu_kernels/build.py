"""Build of the C++ kernels on first use, cached per (torch, compiler, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (the system C++ compiler
through ninja) into a cache folder and loads it, so that ``torch.ops.gptq_cpu.qmatmul`` runs on
the CPU. The kernels are compiled for AVX-512, AVX2 and plain C++ in one library and the
running CPU picks one (no ``-march=native``: a cache folder may be shared by several machines).
Any failure (no compiler, no ninja, a compiler error) is raised as :class:`BuildError` with the
reason in one line, and remembered: the backend then serves through torch's own kernels
(``fallback.py``) and says why. The machinery is :class:`gptq_core.jit.Extension`; this module
declares the extension.

Build ahead of time (e.g. in a container image) with::

    python -m gptq_backends.cpu_kernels.build [--build-dir DIR]

The option ``build_dir`` (:class:`~.options.CpuOptions`, environment fallback
``GPTQ_CPU_BUILD_DIR``) overrides the cache folder (default
``$XDG_CACHE_HOME/gptq-backend-cpu/<key>``, i.e. ``~/.cache/...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gptq_core import jit

from . import ops  # noqa: F401  (the schema must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_cpu_ext"
# -fopenmp: at::parallel_for is a header template that runs OpenMP's parallel region in this
# library; the OpenMP runtime it links is the one torch has already loaded (same soname).
CFLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class BuildError(jit.BuildError):
    """The extension could not be built or loaded; the message says why and what to do."""


EXTENSION = jit.Extension(
    name=EXTENSION_NAME, csrc=CSRC, cache_name="gptq-backend-cpu", what="the cpu C++ kernels",
    source_globs=("*.cpp",), hashed_suffixes=(".cpp", ".h"), cflags=tuple(CFLAGS), ldflags=tuple(LDFLAGS),
    hash_salt=" ".join(CFLAGS), cuda=False, python_module=True, summary_lines=1, summary_limit=600,
    error=BuildError,
)

#: the extension's own answers, under the names plugins, tests and scripts use
sources = EXTENSION.sources
source_hash = EXTENSION.source_hash
toolchain_problems = EXTENSION.toolchain_problems
failure = EXTENSION.failure
module = EXTENSION.module


def compiler() -> str:
    """The C++ compiler torch's builder will call (``$CXX``, else ``c++``)."""
    return jit.compiler()


def build_dir(folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    return EXTENSION.build_dir((Path(compiler()).name,), folder)


def load(folder: Path | None = None, verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    The extension loads once per process: later calls return at once, whatever folder they
    name; a failure is remembered likewise and raised again at once.
    """
    return EXTENSION.load(lambda: jit.Target((Path(compiler()).name,)), folder, verbose)


def isa() -> str:
    """The instruction set the loaded kernels run with: avx512, avx2 or generic."""
    return torch.ops.gptq_cpu_info.isa()


def use_isa(name: str) -> str:
    """Tests only: run the body compiled for ``name`` (avx512, avx2, generic) if this CPU
    supports it, so every body is checked on one machine; returns the previous one."""
    return torch.ops.gptq_cpu_info.use_isa(name)


def main(argv: list[str] | None = None) -> int:
    def build(args: argparse.Namespace) -> tuple[str, Path]:
        from .options import CpuOptions  # noqa: PLC0415

        options = CpuOptions.parse({"build_dir": args.build_dir} if args.build_dir else None, "cpu")
        folder = load(options.build_dir, verbose=args.verbose)
        return f"gptq_cpu ({isa()})", folder

    return EXTENSION.main(
        argv, build, prog="python -m gptq_backends.cpu_kernels.build",
        description="Compile the cpu backend's C++ kernels ahead of time into their cache folder.",
        build_dir_help="where to build (default: option build_dir / GPTQ_CPU_BUILD_DIR, "
                       "else the cache folder)",
    )


if __name__ == "__main__":
    sys.exit(main())
