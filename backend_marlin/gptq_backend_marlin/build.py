"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, architectures, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) for the compute
capabilities of the GPUs present (sm_80 and newer), once per cache key, then loads it so that
``torch.ops.gptq_marlin.*`` run on CUDA. Any failure (no CUDA build of torch, no nvcc, no
ninja, a compiler error) is raised as :class:`BuildError` with the reason, and remembered, so
the probe reports it and the selector falls back to the next backend. The machinery is
:class:`gptq_core.jit.Extension`; this module declares the extension and its architectures.

Build ahead of time (e.g. in a container image) with::

    python -m gptq_backend_marlin.build            # for the GPUs present
    python -m gptq_backend_marlin.build --arch 9.0 # without a GPU

The options ``build_dir`` and ``archs`` (:class:`~.options.MarlinOptions`, environment
fallbacks ``GPTQ_MARLIN_BUILD_DIR`` and ``GPTQ_MARLIN_ARCHS``) override the cache folder (default
``$XDG_CACHE_HOME/gptq-backend-marlin/<key>``, i.e. ``~/.cache/...``) and the architectures
("8.0;9.0"); the command line takes them as ``--build-dir`` and ``--arch``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptq_core import jit

from . import ops  # noqa: F401  (the schemas must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_marlin_ext"
MIN_ARCH = (8, 0)


class BuildError(jit.BuildError):
    """The extension could not be built or loaded; the message says why and what to do."""


EXTENSION = jit.Extension(
    name=EXTENSION_NAME, csrc=CSRC, cache_name="gptq-backend-marlin", what="the marlin CUDA extension",
    shared_headers=True, python_module=True, error=BuildError,
)

#: the extension's own answers, under the names plugins, tests and scripts use
sources = EXTENSION.sources
source_hash = EXTENSION.source_hash
toolchain_problems = EXTENSION.toolchain_problems
failure = EXTENSION.failure
module = EXTENSION.module


def parse_archs(text: str) -> list[tuple[int, int]]:
    """"8.0;9.0" (or "80,90") -> [(8, 0), (9, 0)]; raises BuildError on anything else."""
    return jit.parse_archs(text, "8.0 or 9.0", BuildError)


def present_archs() -> list[tuple[int, int]]:
    """Compute capabilities (>= 8.0) of the visible GPUs."""
    return jit.present_archs(MIN_ARCH)


def arch_flags(archs: list[tuple[int, int]]) -> list[str]:
    return jit.gencode_flags(archs)


def build_dir(archs: list[tuple[int, int]], folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    return EXTENSION.build_dir(jit.cuda_key(archs), folder)


def load(archs: str | list[tuple[int, int]] | None = None, folder: Path | None = None,
         verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    ``archs`` ("8.0;9.0" or a list; default: the GPUs present) and ``folder`` come from the
    options. The extension loads once per process: later calls return at once, whatever
    they ask for; a failure is remembered likewise and raised again at once.
    """
    def target() -> jit.Target:
        chosen = [a for a in parse_archs(archs) if a >= MIN_ARCH] if isinstance(archs, str) else archs
        chosen = present_archs() if chosen is None else chosen
        if not chosen:
            raise BuildError(
                "no CUDA GPU of compute capability >= 8.0 to build for; pass --arch 8.0 "
                "(option archs, or GPTQ_MARLIN_ARCHS) to build ahead of time"
            )
        return jit.Target(jit.cuda_key(chosen), tuple(arch_flags(chosen)))

    return EXTENSION.load(target, folder, verbose)


def main(argv: list[str] | None = None) -> int:
    def build(args: argparse.Namespace) -> tuple[str, Path]:
        from .options import MarlinOptions  # noqa: PLC0415

        options = MarlinOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                       if v is not None}, "marlin")
        folder = load(options.archs, options.build_dir, verbose=args.verbose)
        return f"gptq_marlin for {options.archs or present_archs()}", folder

    return EXTENSION.main(
        argv, build, prog="python -m gptq_backend_marlin.build",
        description="Compile the marlin CUDA extension ahead of time into its cache folder.",
        arch_help='compute capabilities, e.g. "8.0;9.0" (default: option archs / '
                  "GPTQ_MARLIN_ARCHS, else the GPUs present)",
        build_dir_help="where to build (default: option build_dir / GPTQ_MARLIN_BUILD_DIR, "
                       "else the cache folder)",
    )


if __name__ == "__main__":
    sys.exit(main())
