"""Just-in-time build of a backend's C++/CUDA extension: one helper for every JIT-built backend.

A backend declares its extension once (:class:`Extension`: name, ``csrc`` folder, source globs,
flags, cache folder name) and gets what each of them needs (docs/DESIGN.md §3 plugin contract,
§10 errors, §12 options):

* a cache folder ``$XDG_CACHE_HOME/<cache_name>/torch<v>-<parts...>-<source hash>`` keyed by
  everything the build depends on (the caller adds e.g. CUDA version and architectures);
* :meth:`Extension.toolchain_problems` (CUDA torch, nvcc, C++ compiler, ninja);
* :meth:`Extension.load`: thread-safe, once per process through
  ``torch.utils.cpp_extension.load``; a failure is remembered and raised again at once, so the
  probe reports it and the selector falls back;
* :class:`BuildError` carrying the compiler's own error lines, shortened;
* :meth:`Extension.main`, the ``python -m <backend>.build`` command line.

Compute-capability helpers shared by the CUDA backends live here too.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import GPTQError

Arch = tuple[int, int]

#: gptq-core's own C++ headers (gptq_check.h: the argument-check messages of the torch bindings).
SHARED_CSRC = Path(__file__).with_name("csrc")


class BuildError(GPTQError, RuntimeError):
    """An extension could not be built or loaded; the message says why and what to do.

    Each backend subclasses it (``<backend>.build.BuildError``) so its own name stays."""


# --- compute capabilities (the CUDA backends) -------------------------------------------------


def parse_archs(text: str, example: str = "8.0 or 9.0",
                error: type[GPTQError] = BuildError) -> list[Arch]:
    """"8.0;9.0" (or "80,90") -> [(8, 0), (9, 0)]; raises ``error`` on anything else."""
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
            raise error(f"cannot read compute capability {item!r}; write it like {example}") from None
        archs.append((major, minor))
    return sorted(set(archs))


def present_archs(min_arch: Arch | None = None) -> list[Arch]:
    """Compute capabilities of the visible GPUs (those >= ``min_arch`` when given)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(a for a in found if min_arch is None or a >= min_arch)


def gencode_flags(archs: Sequence[Arch]) -> list[str]:
    """Machine code for each architecture: ``-gencode=arch=compute_XY,code=sm_XY``."""
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in archs]


def arch_tag(archs: Sequence[Arch]) -> str:
    """The cache-key part naming the architectures: "sm80_sm90" ("none" for none)."""
    return "_".join(f"sm{a}{b}" for a, b in archs) or "none"


def cuda_key(archs: Sequence[Arch]) -> tuple[str, ...]:
    """The cache-key parts of a CUDA build: the toolkit torch was built with, the architectures."""
    return (f"cuda{torch.version.cuda}", arch_tag(archs))


def nvcc_path() -> str | None:
    """nvcc on PATH, else under CUDA_HOME as torch's builder finds it."""
    found = shutil.which("nvcc")
    if found is None:
        from torch.utils import cpp_extension  # noqa: PLC0415 (slow import, first use only)

        if cpp_extension.CUDA_HOME is not None:
            found = shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin"))
    return found


def parse_arch_list(text: str) -> tuple[Arch, ...]:
    """``nvcc --list-gpu-arch`` output ("compute_75\\ncompute_80 ...") -> ((7, 5), (8, 0), ...)."""
    return tuple(sorted({(int(m[:-1]), int(m[-1])) for m in re.findall(r"compute_(\d+)\b", text)}))


@functools.lru_cache(maxsize=None)
def nvcc_arch_list(nvcc: str | None = None) -> tuple[Arch, ...]:
    """Compute capabilities the CUDA toolkit targets (empty: no nvcc, or it does not answer)."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        return ()
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_arch_list(out)


# --- the extension ----------------------------------------------------------------------------


def summarize(exc: BaseException, max_lines: int = 12, limit: int = 1500) -> str:
    """The compiler's own error lines when there are any, else the exception text, shortened.

    ``max_lines=1`` gives one line: the compiler's first ``error:`` diagnostic, else the first
    line naming an error (torch's "Error building extension ..."), else the first line."""
    text = str(exc)
    if max_lines == 1:
        lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
        lines = [ln for ln in lines if "error:" in ln.lower()] or lines
        summary = lines[0] if lines else (text.strip().splitlines() or [type(exc).__name__])[0]
    else:
        lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
        summary = "\n".join(lines[:max_lines]) if lines else text
    return summary if len(summary) <= limit else summary[:limit] + " ..."


@dataclass(frozen=True)
class Target:
    """What one build is for: its cache-key parts (after torch's version) and extra nvcc flags."""

    key: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()


class _LoadState:
    """Per-process memory of one extension: the lock, the folder and module, or the failure."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.folder: Path | None = None
        self.module: Any = None
        self.error: str | None = None


@dataclass(frozen=True)
class Extension:
    """One JIT-built extension, declared by its backend's ``build.py``.

    The defaults are the CUDA backends' (``*.cu`` and ``*.cpp`` sources, ``-O3``, C++17 for
    nvcc plus the ``-gencode`` flags of :class:`Target`); the cpu backend overrides them."""

    name: str  #: the extension module/library name, e.g. ``gptq_marlin_ext``
    csrc: Path  #: the folder holding the sources (also on the include path)
    cache_name: str  #: the cache folder's name, e.g. ``gptq-backend-marlin``
    what: str  #: how failures name it: "building {what} failed: ..."
    source_globs: tuple[str, ...] = ("*.cu", "*.cpp")
    hashed_suffixes: tuple[str, ...] = (".cu", ".cuh", ".h", ".cpp")
    cflags: tuple[str, ...] = ("-O3",)
    cuda_cflags: tuple[str, ...] = ("-O3", "-std=c++17")
    ldflags: tuple[str, ...] = ()
    #: fed to the source hash before the sources (e.g. the flags, so changing them rebuilds)
    hash_salt: str = ""
    cuda: bool = True  #: needs a CUDA torch and nvcc (else: a host C++ compiler)
    python_module: bool = True  #: import it as a module (else only load the library)
    #: include :data:`SHARED_CSRC` (on the include path and in the source hash)
    shared_headers: bool = False
    summary_lines: int = 12
    summary_limit: int = 1500
    error: type[BuildError] = BuildError
    _state: _LoadState = field(default_factory=_LoadState, init=False, repr=False, compare=False)

    def sources(self) -> list[Path]:
        """The files compiled into the extension (headers are included by them)."""
        return [p for pattern in self.source_globs for p in sorted(self.csrc.glob(pattern))]

    def source_hash(self) -> str:
        """16 hex digits over the salt and every source and header (name and bytes), the
        shared headers included when the extension uses them."""
        digest = hashlib.sha256(self.hash_salt.encode()) if self.hash_salt else hashlib.sha256()
        for folder in self.include_dirs():
            for path in sorted(folder.iterdir()):
                if path.suffix in self.hashed_suffixes:
                    digest.update(path.name.encode())
                    digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def include_dirs(self) -> list[Path]:
        """The extension's own ``csrc``, then gptq-core's shared headers when it uses them."""
        return [self.csrc, SHARED_CSRC] if self.shared_headers else [self.csrc]

    def build_dir(self, key: Sequence[str] = (), folder: Path | None = None) -> Path:
        """``folder`` when given, else a cache folder named by everything the build depends on."""
        if folder is not None:
            return Path(folder).expanduser()
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        name = "-".join([f"torch{torch.__version__}", *key, self.source_hash()])
        return cache / self.cache_name / name.replace("+", "_")

    def toolchain_problems(self) -> list[str]:
        """What is missing to compile at all (empty when a build can be attempted)."""
        problems = []
        if self.cuda:
            if torch.version.cuda is None:
                problems.append(f"this torch build ({torch.__version__}) has no CUDA support; "
                                "install a CUDA build of torch")
            elif nvcc_path() is None:
                problems.append("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
        elif shutil.which(compiler()) is None:
            problems.append(f"C++ compiler {compiler()!r} not found: install g++ (or set CXX)")
        if shutil.which("ninja") is None:
            problems.append("ninja not found: pip install ninja")
        return problems

    def load(self, target: Callable[[], Target] | None = None, folder: Path | None = None,
             verbose: bool = False) -> Path:
        """Build (if needed) and load the extension; return its build folder. Raises ``error``.

        ``target`` (called under the lock, after the toolchain check) says what to build for;
        its BuildError is remembered like a compiler's. The extension loads once per process:
        later calls return at once, whatever they ask for; a failure likewise is raised again.
        """
        state = self._state
        with state.lock:
            if state.folder is not None:
                return state.folder
            if state.error is not None:
                raise self.error(state.error)
            try:
                problems = self.toolchain_problems()
                if problems:
                    raise self.error("; ".join(problems))
                plan = target() if target is not None else Target()
                out = self.build_dir(plan.key, folder)
                out.mkdir(parents=True, exist_ok=True)
                from torch.utils import cpp_extension  # noqa: PLC0415 (slow import, first use only)

                try:
                    module = cpp_extension.load(
                        name=self.name,
                        sources=[str(p) for p in self.sources()],
                        extra_cflags=list(self.cflags),
                        extra_cuda_cflags=[*self.cuda_cflags, *plan.cuda_cflags] if self.cuda else None,
                        extra_ldflags=list(self.ldflags) or None,
                        extra_include_paths=[str(p) for p in self.include_dirs()],
                        build_directory=str(out),
                        is_python_module=self.python_module,
                        verbose=verbose,
                    )
                except Exception as exc:  # noqa: BLE001 - compiler and loader errors alike
                    summary = summarize(exc, self.summary_lines, self.summary_limit)
                    raise self.error(f"building {self.what} failed: {summary}") from exc
            except BuildError as exc:
                state.error = str(exc)
                if not isinstance(exc, self.error):
                    raise self.error(state.error) from exc
                raise
            state.folder = out
            state.module = module if self.python_module else None
            return out

    def module(self) -> Any:
        """The loaded extension's Python module, or None before :meth:`load` (or for a library)."""
        return self._state.module

    def failure(self) -> str | None:
        """The reason an earlier build failed in this process, or None."""
        return self._state.error

    def main(self, argv: list[str] | None, build: Callable[[argparse.Namespace], tuple[str, Path]], *,
             prog: str, description: str, build_dir_help: str, arch_help: str | None = None) -> int:
        """The ``python -m <backend>.build`` command: ``--arch`` (when ``arch_help``),
        ``--build-dir``, ``--verbose``; ``build(args)`` loads and returns (what was built, folder).
        A GPTQError is printed as one ``error:`` line and exit status 1."""
        parser = argparse.ArgumentParser(prog=prog, description=description)
        if arch_help is not None:
            parser.add_argument("--arch", default=None, help=arch_help)
        parser.add_argument("--build-dir", default=None, type=Path, help=build_dir_help)
        parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
        args = parser.parse_args(argv)
        started = time.perf_counter()
        try:
            built, folder = build(args)
        except GPTQError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"built {built} in {time.perf_counter() - started:.1f} s: {folder}")
        return 0


def compiler() -> str:
    """The C++ compiler torch's builder will call (``$CXX``, else ``c++``)."""
    return os.environ.get("CXX", "c++")
