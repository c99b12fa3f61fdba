"""Build of the C++ kernels on first use, cached per (torch, compiler, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (the system C++ compiler
through ninja) into a cache folder and loads it, so that ``torch.ops.gptq_cpu.qmatmul`` runs on
the CPU. The kernels are compiled for AVX-512, AVX2 and plain C++ in one library and the
running CPU picks one (no ``-march=native``: a cache folder may be shared by several machines).
Any failure (no compiler, no ninja, a compiler error) is raised as :class:`BuildError` with the
reason in one line, and remembered: the backend then serves through torch's own kernels
(``fallback.py``) and says why.

Build ahead of time (e.g. in a container image) with::

    python -m gptq_backends.cpu_kernels.build [--build-dir DIR]

The option ``build_dir`` (:class:`~.options.CpuOptions`, environment fallback
``GPTQ_CPU_BUILD_DIR``) overrides the cache folder (default
``$XDG_CACHE_HOME/gptq-backend-cpu/<key>``, i.e. ``~/.cache/...``).
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

from . import ops  # noqa: F401  (the schema must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_cpu_ext"
# -fopenmp: at::parallel_for is a header template that runs OpenMP's parallel region in this
# library; the OpenMP runtime it links is the one torch has already loaded (same soname).
CFLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class BuildError(GPTQError, RuntimeError):
    """The extension could not be built or loaded; the message says why and what to do."""


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def source_hash() -> str:
    digest = hashlib.sha256(" ".join(CFLAGS).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def compiler() -> str:
    """The C++ compiler torch's builder will call (``$CXX``, else ``c++``)."""
    return os.environ.get("CXX", "c++")


def build_dir(folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    if folder is not None:
        return Path(folder).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    key = f"torch{torch.__version__}-{Path(compiler()).name}-{source_hash()}"
    return cache / "gptq-backend-cpu" / key.replace("+", "_")


def toolchain_problems() -> list[str]:
    """What is missing to compile at all (empty when a build can be attempted)."""
    problems = []
    if shutil.which(compiler()) is None:
        problems.append(f"C++ compiler {compiler()!r} not found: install g++ (or set CXX)")
    if shutil.which("ninja") is None:
        problems.append("ninja not found: pip install ninja")
    return problems


def _summarize(exc: BaseException, limit: int = 600) -> str:
    """The compiler's first error line when there is one, else the exception's first line."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    summary = lines[0] if lines else (text.strip().splitlines() or [type(exc).__name__])[0]
    return summary if len(summary) <= limit else summary[:limit] + " ..."


_lock = threading.Lock()
_loaded: Path | None = None
_module: Any = None
_error: str | None = None


def load(folder: Path | None = None, verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    The extension loads once per process: later calls return at once, whatever folder they
    name; a failure is remembered likewise and raised again at once.
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
            folder = build_dir(folder)
            folder.mkdir(parents=True, exist_ok=True)
            from torch.utils import cpp_extension  # noqa: PLC0415 (slow import, first use only)

            try:
                module = cpp_extension.load(
                    name=EXTENSION_NAME,
                    sources=[str(p) for p in sources()],
                    extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS,
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(folder),
                    is_python_module=True,
                    verbose=verbose,
                )
            except Exception as exc:  # noqa: BLE001 - compiler and loader errors alike
                raise BuildError(f"building the cpu C++ kernels failed: {_summarize(exc)}") from exc
        except BuildError as exc:
            _error = str(exc)
            raise
        _loaded, _module = folder, module
        return folder


def module() -> Any:
    """The loaded extension's Python module (its direct ``qmatmul``), or None before :func:`load`."""
    return _module


def failure() -> str | None:
    """The reason an earlier build failed in this process, or None."""
    return _error


def isa() -> str:
    """The instruction set the loaded kernels run with: avx512, avx2 or generic."""
    return torch.ops.gptq_cpu_info.isa()


def use_isa(name: str) -> str:
    """Tests only: run the body compiled for ``name`` (avx512, avx2, generic) if this CPU
    supports it, so every body is checked on one machine; returns the previous one."""
    return torch.ops.gptq_cpu_info.use_isa(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptq_backends.cpu_kernels.build",
        description="Compile the cpu backend's C++ kernels ahead of time into their cache folder.",
    )
    parser.add_argument("--build-dir", default=None, type=Path,
                        help="where to build (default: option build_dir / GPTQ_CPU_BUILD_DIR, "
                             "else the cache folder)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    from .options import CpuOptions  # noqa: PLC0415

    try:
        options = CpuOptions.parse({"build_dir": args.build_dir} if args.build_dir else None, "cpu")
        started = time.perf_counter()
        folder = load(options.build_dir, verbose=args.verbose)
    except GPTQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built gptq_cpu ({isa()}) in {time.perf_counter() - started:.1f} s: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
