"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, architectures, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) for the compute
capabilities of the GPUs present (sm_80 and newer), once per cache key, then loads it so that
``torch.ops.gptq_marlin.*`` run on CUDA. Any failure (no CUDA build of torch, no nvcc, no
ninja, a compiler error) is raised as :class:`BuildError` with the reason, and remembered, so
the probe reports it and the selector falls back to the next backend.

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
import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from gptq_core.errors import GPTQError

from . import ops  # noqa: F401  (the schemas must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_marlin_ext"
MIN_ARCH = (8, 0)


class BuildError(GPTQError, RuntimeError):
    """The extension could not be built or loaded; the message says why and what to do."""


def sources() -> list[Path]:
    """The files compiled into the extension (the .cuh/.h headers are included by them)."""
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def parse_archs(text: str) -> list[tuple[int, int]]:
    """"8.0;9.0" (or "80,90") -> [(8, 0), (9, 0)]; raises BuildError on anything else."""
    archs = []
    for item in text.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        try:
            if "." in item:
                major, minor = (int(p) for p in item.split("."))
            else:
                major, minor = int(item[:-1]), int(item[-1])
        except ValueError:
            raise BuildError(f"cannot read compute capability {item!r}; write it like 8.0 or 9.0")
        archs.append((major, minor))
    return sorted(set(archs))


def present_archs() -> list[tuple[int, int]]:
    """Compute capabilities (>= 8.0) of the visible GPUs."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(a for a in found if a >= MIN_ARCH)


def arch_flags(archs: list[tuple[int, int]]) -> list[str]:
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in archs]


def build_dir(archs: list[tuple[int, int]], folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    if folder is not None:
        return Path(folder).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    arch_tag = "_".join(f"sm{a}{b}" for a, b in archs) or "none"
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-{arch_tag}-{source_hash()}"
    return cache / "gptq-backend-marlin" / key.replace("+", "_")


def toolchain_problems() -> list[str]:
    """What is missing to compile at all (empty when a build can be attempted)."""
    from torch.utils import cpp_extension

    problems = []
    if torch.version.cuda is None:
        problems.append(
            f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
        )
    elif shutil.which("nvcc") is None and (
        cpp_extension.CUDA_HOME is None
        or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None
    ):
        problems.append("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    if shutil.which("ninja") is None:
        problems.append("ninja not found: pip install ninja")
    return problems


def _summarize(exc: BaseException, limit: int = 1500) -> str:
    """The compiler's own error lines when there are any, else the exception text, shortened."""
    text = str(exc)
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    summary = "\n".join(lines[:12]) if lines else text
    return summary if len(summary) <= limit else summary[:limit] + " ..."


_lock = threading.Lock()
_loaded: Path | None = None
_module: Any = None
_error: str | None = None


def load(archs: str | list[tuple[int, int]] | None = None, folder: Path | None = None,
         verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    ``archs`` ("8.0;9.0" or a list; default: the GPUs present) and ``folder`` come from the
    options. The extension loads once per process: later calls return at once, whatever
    they ask for; a failure is remembered likewise and raised again at once.
    """
    global _loaded, _module, _error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _error is not None:
            raise BuildError(_error)
        try:
            problems = toolchain_problems()
            if problems:
                raise BuildError("; ".join(problems))
            if isinstance(archs, str):
                archs = [a for a in parse_archs(archs) if a >= MIN_ARCH]
            archs = present_archs() if archs is None else archs
            if not archs:
                raise BuildError(
                    "no CUDA GPU of compute capability >= 8.0 to build for; pass --arch 8.0 "
                    "(option archs, or GPTQ_MARLIN_ARCHS) to build ahead of time"
                )
            folder = build_dir(archs, folder)
            folder.mkdir(parents=True, exist_ok=True)
            from torch.utils import cpp_extension

            try:
                module = cpp_extension.load(
                    name=EXTENSION_NAME,
                    sources=[str(p) for p in sources()],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-std=c++17", *arch_flags(archs)],
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(folder),
                    is_python_module=True,
                    verbose=verbose,
                )
            except Exception as exc:  # noqa: BLE001 - compiler and loader errors alike
                raise BuildError(f"building the marlin CUDA extension failed: {_summarize(exc)}") from exc
        except BuildError as exc:
            _error = str(exc)
            raise
        _loaded, _module = folder, module
        return folder


def module() -> Any:
    """The loaded extension's Python module (its direct ``gemm``), or None before :func:`load`."""
    return _module


def failure() -> str | None:
    """The reason an earlier build failed in this process, or None."""
    return _error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptq_backend_marlin.build",
        description="Compile the marlin CUDA extension ahead of time into its cache folder.",
    )
    parser.add_argument("--arch", default=None,
                        help='compute capabilities, e.g. "8.0;9.0" (default: option archs / '
                             "GPTQ_MARLIN_ARCHS, else the GPUs present)")
    parser.add_argument("--build-dir", default=None, type=Path,
                        help="where to build (default: option build_dir / GPTQ_MARLIN_BUILD_DIR, "
                             "else the cache folder)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    from .options import MarlinOptions  # noqa: PLC0415

    try:
        options = MarlinOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                       if v is not None}, "marlin")
        started = time.perf_counter()
        folder = load(options.archs, options.build_dir, verbose=args.verbose)
    except GPTQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built gptq_marlin for {options.archs or present_archs()} in "
          f"{time.perf_counter() - started:.1f} s: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
