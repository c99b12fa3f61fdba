"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, architectures, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) for the compute
capabilities of the GPUs present, once per cache key, then loads it so that
``torch.ops.gptq_cuda.*`` run on CUDA. Any failure (no CUDA build of torch, no nvcc, no ninja,
a compiler error) is raised as :class:`BuildError` with the reason and remembered, so the probe
reports it and the selector falls back to the next backend. The machinery is
:class:`gptq_core.jit.Extension`; this module declares the extension and its architectures.

Which compute capabilities can be built is decided by the user's nvcc: ``nvcc
--list-gpu-arch`` names the virtual architectures it targets (CUDA 13: compute_75 and newer;
CUDA 12 also compute_60 and compute_70). The kernels themselves need sm_75 (``mma.sync``
m16n8k8; bf16 activations need sm_80), so 6.x and 7.0 are refused by the declared minimum
whatever the toolkit, and a newer GPU whose architecture the toolkit does not list is refused
by the probe with that reason.

Build ahead of time (e.g. in a container image) with::

    python -m gptq_backend_cuda.build                 # for the GPUs present
    python -m gptq_backend_cuda.build --arch "7.5;9.0" --build-dir DIR   # without a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gptq_core import jit

from . import ops  # noqa: F401  (the schemas must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_cuda_ext"
#: mma.sync.m16n8k8 (f16) is the oldest tensor-core instruction the kernels use.
MIN_ARCH = (7, 5)
#: bf16 operands of mma.sync exist from sm_80 on.
MIN_BF16_ARCH = (8, 0)


class BuildError(jit.BuildError):
    """The extension could not be built or loaded; the message says why and what to do."""


EXTENSION = jit.Extension(
    name=EXTENSION_NAME, csrc=CSRC, cache_name="gptq-backend-cuda", what="the cuda extension",
    shared_headers=True, python_module=False, error=BuildError,
)

#: the extension's own answers, under the names plugins, tests and scripts use
sources = EXTENSION.sources
source_hash = EXTENSION.source_hash
toolchain_problems = EXTENSION.toolchain_problems
failure = EXTENSION.failure


def parse_archs(text: str) -> list[tuple[int, int]]:
    """"7.5;9.0" (or "75,90") -> [(7, 5), (9, 0)]; raises BuildError on anything else."""
    return jit.parse_archs(text, "7.5 or 9.0", BuildError)


def nvcc_path() -> str | None:
    """nvcc on PATH, else under CUDA_HOME as torch's builder finds it."""
    return jit.nvcc_path()


def parse_arch_list(text: str) -> frozenset[tuple[int, int]]:
    """``nvcc --list-gpu-arch`` output ("compute_75\\ncompute_80 ...") -> {(7, 5), (8, 0), ...}."""
    return frozenset(jit.parse_arch_list(text))


def nvcc_archs() -> frozenset[tuple[int, int]] | None:
    """The compute capabilities the user's nvcc targets (None: no nvcc, or it cannot say)."""
    return frozenset(jit.nvcc_arch_list()) or None


def arch_problem(cc: tuple[int, int], act_dtype: torch.dtype | None = None,
                 toolkit: frozenset[tuple[int, int]] | None = None) -> str | None:
    """Why a GPU of compute capability ``cc`` cannot run the kernels (None: it can).

    ``toolkit`` is what nvcc targets (:func:`nvcc_archs`); None skips that check.
    """
    have = f"{cc[0]}.{cc[1]}"
    if cc < MIN_ARCH:
        return (f"compute capability {have} has no mma.sync.m16n8k8 (the kernels need 7.5 or newer); "
                "the torch backend serves it")
    if act_dtype == torch.bfloat16 and cc < MIN_BF16_ARCH:
        return f"bfloat16 activations need compute capability 8.0 (bf16 mma), this GPU has {have}"
    if toolkit is not None and cc not in toolkit:
        listed = ", ".join(f"{a}.{b}" for a, b in sorted(toolkit))
        return (f"this nvcc does not target compute capability {have} (nvcc --list-gpu-arch: {listed}); "
                "install a CUDA toolkit that does")
    return None


def arch_flags(archs: list[tuple[int, int]]) -> list[str]:
    return jit.gencode_flags(archs)


def present_archs() -> list[tuple[int, int]]:
    """Compute capabilities (>= 7.5) of the visible GPUs."""
    return jit.present_archs(MIN_ARCH)


def build_dir(archs: list[tuple[int, int]], folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    return EXTENSION.build_dir(jit.cuda_key(archs), folder)


def load(archs: str | list[tuple[int, int]] | None = None, folder: Path | None = None,
         verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    ``archs`` ("7.5;9.0" or a list; default: the GPUs present) and ``folder`` come from the
    options. The extension loads once per process: later calls return at once, whatever they
    ask for; a failure is remembered likewise and raised again at once.
    """
    def target() -> jit.Target:
        chosen = parse_archs(archs) if isinstance(archs, str) else archs
        chosen = present_archs() if chosen is None else [a for a in chosen if a >= MIN_ARCH]
        toolkit = nvcc_archs()
        if toolkit is not None:
            skipped = [a for a in chosen if a not in toolkit]
            if skipped:
                raise BuildError("; ".join(arch_problem(a, toolkit=toolkit) or "" for a in skipped))
        if not chosen:
            raise BuildError(
                "no CUDA GPU of compute capability >= 7.5 to build for; pass --arch 7.5 "
                "(option archs) to build ahead of time"
            )
        return jit.Target(jit.cuda_key(chosen), tuple(arch_flags(chosen)))

    return EXTENSION.load(target, folder, verbose)


def main(argv: list[str] | None = None) -> int:
    def build(args: argparse.Namespace) -> tuple[str, Path]:
        from .options import CudaOptions  # noqa: PLC0415

        options = CudaOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                     if v is not None}, "cuda")
        folder = load(options.archs, options.build_dir, verbose=args.verbose)
        return f"gptq_cuda for {options.archs or present_archs()}", folder

    return EXTENSION.main(
        argv, build, prog="python -m gptq_backend_cuda.build",
        description="Compile the cuda backend's extension ahead of time into its cache folder.",
        arch_help='compute capabilities, e.g. "7.5;9.0" (default: the GPUs present)',
        build_dir_help="where to build (default: a cache folder; pass the same folder as the "
                       "option build_dir at load)",
    )


if __name__ == "__main__":
    sys.exit(main())
