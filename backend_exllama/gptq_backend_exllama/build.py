"""Just-in-time build of the CUDA extension, cached per (torch, CUDA, architectures, sources).

``load()`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja) for the compute
capabilities of the GPUs present, once per cache key, then loads it so that
``torch.ops.gptq_exllama.*`` run on CUDA. Any failure (no CUDA build of torch, no nvcc, no
ninja, an architecture the toolkit cannot build, a compiler error) is raised as
:class:`BuildError` with the reason, and remembered, so the probe reports it and the selector
falls back to the next backend.

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
EXTENSION_NAME = "gptq_exllama_ext"
MIN_ARCH = (6, 0)  # fma.rn.f16x2 and the fp16 conversions the kernels use

Arch = tuple[int, int]


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


def parse_archs(text: str) -> list[Arch]:
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
    from torch.utils import cpp_extension

    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME is not None:
        found = shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin"))
    return found


@functools.lru_cache(maxsize=None)
def toolkit_archs(nvcc: str | None = None) -> tuple[Arch, ...]:
    """Compute capabilities the CUDA toolkit can build for (``nvcc --list-gpu-arch``); empty
    when there is no nvcc or it does not answer."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        return ()
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = {(int(m[:-1]), int(m[-1])) for m in re.findall(r"compute_(\d+)\b", out)}
    return tuple(sorted(found))


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
    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def build_dir(archs: list[Arch], folder: Path | None = None) -> Path:
    """``folder`` when given, else a cache folder named by everything the build depends on."""
    if folder is not None:
        return Path(folder).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    arch_tag = "_".join(f"sm{a}{b}" for a, b in archs) or "none"
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-{arch_tag}-{source_hash()}"
    return cache / "gptq-backend-exllama" / key.replace("+", "_")


def toolchain_problems() -> list[str]:
    """What is missing to compile at all (empty when a build can be attempted)."""
    problems = []
    if torch.version.cuda is None:
        problems.append(
            f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch")
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


def load(archs: str | list[Arch] | None = None, folder: Path | None = None, verbose: bool = False) -> Path:
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
            archs = present_archs() if archs is None else list(archs)
            if not archs:
                raise BuildError("no CUDA GPU to build for; pass --arch 7.5 (option archs) to build ahead of time")
            available = toolkit_archs()
            bad = [p for a in archs if (p := arch_problem(a, available))]
            if bad:
                raise BuildError("; ".join(bad))
            folder = build_dir(archs, folder)
            folder.mkdir(parents=True, exist_ok=True)
            from torch.utils import cpp_extension

            try:
                cpp_extension.load(
                    name=EXTENSION_NAME,
                    sources=[str(p) for p in sources()],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-std=c++17", *arch_flags(archs, available)],
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(folder),
                    is_python_module=False,
                    verbose=verbose,
                )
            except Exception as exc:  # noqa: BLE001 - compiler and loader errors alike
                raise BuildError(f"building the exllama CUDA extension failed: {_summarize(exc)}") from exc
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
        prog="python -m gptq_backend_exllama.build",
        description="Compile the exllama CUDA extension ahead of time into its cache folder.",
    )
    parser.add_argument("--arch", default=None,
                        help='compute capabilities, e.g. "7.5;8.6" (default: the GPUs present)')
    parser.add_argument("--build-dir", default=None, type=Path,
                        help="where to build (default: the cache folder)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    from .options import ExllamaOptions  # noqa: PLC0415

    try:
        options = ExllamaOptions.parse({k: v for k, v in (("archs", args.arch), ("build_dir", args.build_dir))
                                        if v is not None}, "exllama")
        started = time.perf_counter()
        folder = load(options.archs, options.build_dir, verbose=args.verbose)
    except GPTQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built gptq_exllama for {options.archs or present_archs()} in "
          f"{time.perf_counter() - started:.1f} s: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
