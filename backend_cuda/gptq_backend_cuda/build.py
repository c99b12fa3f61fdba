"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, architectures, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) for the compute
capabilities of the GPUs present, once per cache key, then loads it so that
``torch.ops.gptq_cuda.*`` run on CUDA. Any failure (no CUDA build of torch, no nvcc, no ninja,
a compiler error) is raised as :class:`BuildError` with the reason and remembered, so the probe
reports it and the selector falls back to the next backend.

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
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from gptq_core.errors import GPTQError

from . import ops  # noqa: F401  (the schemas must exist before the library registers kernels)

CSRC = Path(__file__).with_name("csrc")
EXTENSION_NAME = "gptq_cuda_ext"
#: mma.sync.m16n8k8 (f16) is the oldest tensor-core instruction the kernels use.
MIN_ARCH = (7, 5)
#: bf16 operands of mma.sync exist from sm_80 on.
MIN_BF16_ARCH = (8, 0)


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
    """"7.5;9.0" (or "75,90") -> [(7, 5), (9, 0)]; raises BuildError on anything else."""
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
            raise BuildError(f"cannot read compute capability {item!r}; write it like 7.5 or 9.0") from None
        archs.append((major, minor))
    return sorted(set(archs))


def nvcc_path() -> str | None:
    """nvcc on PATH, else under CUDA_HOME as torch's builder finds it."""
    found = shutil.which("nvcc")
    if found is None:
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is not None:
            found = shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin"))
    return found


def parse_arch_list(text: str) -> frozenset[tuple[int, int]]:
    """``nvcc --list-gpu-arch`` output ("compute_75\\ncompute_80 ...") -> {(7, 5), (8, 0), ...}."""
    return frozenset((int(m.group(1)[:-1]), int(m.group(1)[-1])) for m in re.finditer(r"compute_(\d+)", text))


@functools.lru_cache(maxsize=1)
def nvcc_archs() -> frozenset[tuple[int, int]] | None:
    """The compute capabilities the user's nvcc targets (None: no nvcc, or it cannot say)."""
    nvcc = nvcc_path()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_arch_list(out) or None


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
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in archs]


def present_archs() -> list[tuple[int, int]]:
    """Compute capabilities (>= 7.5) of the visible GPUs."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(a for a in found if a >= MIN_ARCH)


def build_dir(archs: list[tuple[int, int]], folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    if folder is not None:
        return Path(folder).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    arch_tag = "_".join(f"sm{a}{b}" for a, b in archs) or "none"
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-{arch_tag}-{source_hash()}"
    return cache / "gptq-backend-cuda" / key.replace("+", "_")


def toolchain_problems() -> list[str]:
    """What is missing to compile at all (empty when a build can be attempted)."""
    problems = []
    if torch.version.cuda is None:
        problems.append(
            f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
        )
    elif nvcc_path() is None:
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
_error: str | None = None


def load(archs: str | list[tuple[int, int]] | None = None, folder: Path | None = None,
         verbose: bool = False) -> Path:
    """Build (if needed) and load the extension; return its build folder. Raises BuildError.

    ``archs`` ("7.5;9.0" or a list; default: the GPUs present) and ``folder`` come from the
    options. The extension loads once per process: later calls return at once, whatever they
    ask for; a failure is remembered likewise and raised again at once.
    """
    global _loaded, _error
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
                archs = parse_archs(archs)
            archs = present_archs() if archs is None else [a for a in archs if a >= MIN_ARCH]
            toolkit = nvcc_archs()
            if toolkit is not None:
                skipped = [a for a in archs if a not in toolkit]
                if skipped:
                    raise BuildError("; ".join(arch_problem(a, toolkit=toolkit) or "" for a in skipped))
            if not archs:
                raise BuildError(
                    "no CUDA GPU of compute capability >= 7.5 to build for; pass --arch 7.5 "
                    "(option archs) to build ahead of time"
                )
            folder = build_dir(archs, folder)
            folder.mkdir(parents=True, exist_ok=True)
            from torch.utils import cpp_extension

            try:
                cpp_extension.load(
                    name=EXTENSION_NAME,
                    sources=[str(p) for p in sources()],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-std=c++17", *arch_flags(archs)],
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(folder),
                    is_python_module=False,
                    verbose=verbose,
                )
            except Exception as exc:  # noqa: BLE001 - compiler and loader errors alike
                raise BuildError(f"building the cuda extension failed: {_summarize(exc)}") from exc
        except BuildError as exc:
            _error = str(exc)
            raise
        _loaded = folder
        return folder


def failure() -> str | None:
    """The reason an earlier build failed in this process, or None."""
    return _error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptq_backend_cuda.build",
        description="Compile the cuda backend's extension ahead of time into its cache folder.",
    )
    parser.add_argument("--arch", default=None,
                        help='compute capabilities, e.g. "7.5;9.0" (default: the GPUs present)')
    parser.add_argument("--build-dir", default=None, type=Path,
                        help="where to build (default: a cache folder; pass the same folder as the "
                             "option build_dir at load)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    from .options import CudaOptions  # noqa: PLC0415

    try:
        options = CudaOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                     if v is not None}, "cuda")
        started = time.perf_counter()
        folder = load(options.archs, options.build_dir, verbose=args.verbose)
    except GPTQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built gptq_cuda for {options.archs or present_archs()} in "
          f"{time.perf_counter() - started:.1f} s: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
