"""Which constructs of the CUDA backends' sources have no HIP equivalent as written.

The cuda and exllama distributions ship CUDA C++ (their ``csrc/``); hipify renames the runtime
API but cannot translate NVIDIA-only code: inline PTX (``asm("lop3.b32 ...")``, ``mma.sync``,
``ld.global.nc``, ``cvt``), the cache-hint load/store intrinsics (``__ldcs``, ``__ldcg``,
``__stcg``) and, with the ROCm 5.2 headers Debian packages, ``cuda_bf16.h`` (hip_bf16.h came
in ROCm 5.7). Each such site would need an ``#if defined(__HIP_PLATFORM_AMD__)`` alternative in
the owning distribution; this module finds them in the shipped sources, so the probe's reason
and the README's list stay true as those sources change.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

#: The distributions whose kernels are hipified: name -> (package, what its kernels need).
SOURCES = {"exllama": "gptq_backend_exllama", "cuda": "gptq_backend_cuda"}
_ASM = re.compile(r'\basm\s*(?:volatile\s*)?\(\s*"\s*(?:\{\s*(?:\\n)?\s*)?([^"]*)')
_INTRINSIC = re.compile(r"\b(__ldcs|__ldcg|__ldcv|__ldlu|__stcs|__stcg|__stwb|__stwt)\s*\(")
_BF16 = re.compile(r"#\s*include\s*<cuda_bf16\.h>")


@dataclass(frozen=True)
class Site:
    """One NVIDIA-only construct: file name, 1-based line, and what it is."""

    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.what}"


def csrc(dist: str) -> Path:
    """The ``csrc/`` folder the installed distribution ships (found without importing it)."""
    if dist not in SOURCES:
        raise ValueError(f"unknown source distribution {dist!r}; expected one of {sorted(SOURCES)}")
    spec = importlib.util.find_spec(SOURCES[dist])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SOURCES[dist]} is not installed: pip install gptq-backend-{dist} (the rocm backend "
            "hipifies its sources)")
    return Path(next(iter(spec.submodule_search_locations))) / "csrc"


def _first_instruction(body: str) -> str:
    body = body.replace("\\n", " ").strip()
    for stmt in body.split(";"):
        word = stmt.strip().split(" ")[0]
        if word and not word.startswith(".reg") and word != "mov.b32":
            return word
    return body.split(" ")[0] or "asm"


def scan_text(name: str, text: str) -> list[Site]:
    """The NVIDIA-only sites of one source file's text (comments are not parsed out: the CUDA
    backends only name PTX in comments without an ``asm(`` call)."""
    sites = []
    lines = text.splitlines()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def code(number: int) -> bool:
        return not lines[number - 1].lstrip().startswith("//")

    for m in _ASM.finditer(text):  # an asm( may open its string on the next line
        if code(line_of(m.start())):
            sites.append(Site(name, line_of(m.start()), f"inline PTX {_first_instruction(m.group(1))}"))
    for m in _INTRINSIC.finditer(text):
        if code(line_of(m.start())):
            sites.append(Site(name, line_of(m.start()), f"cache-hint intrinsic {m.group(1)}"))
    for m in _BF16.finditer(text):
        sites.append(Site(name, line_of(m.start()), "cuda_bf16.h (needs hip_bf16.h, ROCm >= 5.7)"))
    return sorted(sites, key=lambda s: s.line)


def scan(dist: str) -> list[Site]:
    """Every NVIDIA-only site of a distribution's shipped sources, by file and line."""
    sites = []
    for path in sorted(csrc(dist).iterdir()):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            sites += scan_text(path.name, path.read_text())
    return sites


def includes(path: Path) -> set[str]:
    """Local headers a file includes, transitively (``#include "x.cuh"``)."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        for m in re.finditer(r'#\s*include\s*"([^"]+)"', todo.pop().read_text()):
            if m.group(1) not in seen and (path.parent / m.group(1)).exists():
                seen.add(m.group(1))
                todo.append(path.parent / m.group(1))
    return seen


def unit_blockers(dist: str) -> dict[str, list[Site]]:
    """For each translation unit (.cu/.cpp) of ``dist``, the NVIDIA-only sites it compiles
    (its own and its headers'): an empty list means the unit hipifies as it is."""
    folder = csrc(dist)
    by_file: dict[str, list[Site]] = {}
    for site in scan(dist):
        by_file.setdefault(site.file, []).append(site)
    out = {}
    for unit in sorted(folder.glob("*.cu")) + sorted(folder.glob("*.cpp")):
        files = [unit.name, *sorted(includes(unit))]
        out[unit.name] = [s for f in files for s in by_file.get(f, [])]
    return out


def reason(dist: str, limit: int = 4) -> str | None:
    """One line saying why ``dist``'s kernels cannot be built for HIP (None: they can)."""
    sites = scan(dist)
    if not sites:
        return None
    shown = ", ".join(str(s) for s in sites[:limit])
    more = f" and {len(sites) - limit} more" if len(sites) > limit else ""
    return (f"the {dist} kernels are not portable to HIP as written: {shown}{more} "
            f"(each needs an #if defined(__HIP_PLATFORM_AMD__) alternative in gptq-backend-{dist})")
