"""Which constructs of the CUDA backends' sources have no HIP equivalent as written.

The cuda and exllama distributions ship CUDA C++ (their ``csrc/``); hipify renames the runtime
API but cannot translate NVIDIA-only code: inline PTX (``asm("lop3.b32 ...")``, ``mma.sync``,
``ld.global.nc``, ``cvt``), the cache-hint load/store intrinsics (``__ldcs``, ``__ldcg``,
``__stcg``) and, with the ROCm 5.2 headers Debian packages, ``cuda_bf16.h`` (hip_bf16.h came
in ROCm 5.7). Each such site needs an AMD alternative in the owning distribution, under a
preprocessor guard (:data:`GUARDS`: ``#if GPTQ_HIP`` ... ``#else`` NVIDIA code ``#endif``).
This module finds the sites in the shipped sources and tells the guarded ones (compiled for
NVIDIA only) from the blocking ones, so the probe's reason and the README's list stay true as
those sources change.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

#: The distributions whose kernels are hipified: name -> package.
SOURCES = {"exllama": "gptq_backend_exllama", "cuda": "gptq_backend_cuda"}
#: Macros whose preprocessor tests split AMD code from NVIDIA code: the distributions' own
#: guard (exllama's csrc/portable.cuh defines GPTQ_HIP from __HIP_PLATFORM_AMD__), hipcc's
#: platform macro, and the one torch's ROCm extension builds define.
GUARDS = ("GPTQ_HIP", "__HIP_PLATFORM_AMD__", "USE_ROCM")

_ASM = re.compile(r'\basm\s*(?:volatile\s*)?\(\s*"\s*(?:\{\s*(?:\\n)?\s*)?([^"]*)')
_INTRINSIC = re.compile(r"\b(__ldcs|__ldcg|__ldcv|__ldlu|__stcs|__stcg|__stwb|__stwt)\s*\(")
_BF16 = re.compile(r"#\s*include\s*<cuda_bf16\.h>")
_DIRECTIVE = re.compile(r"^\s*#\s*(ifdef|ifndef|if|elif|else|endif)\b(.*)$")

# Branch kinds of a preprocessor conditional: compiled for AMD only, for NVIDIA only, or either.
HIP, NVIDIA, EITHER = "hip", "nvidia", "either"


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


def strip_comments(text: str) -> str:
    """``text`` with every comment blanked (newlines kept, so line numbers stay), string and
    character literals left alone: a comment may name ``__ldcs(`` without being code."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start`` (-1: unbalanced)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _guard_test(directive: str, expr: str) -> str:
    """The branch kind a conditional's first branch selects: HIP for ``#if GPTQ_HIP``,
    ``#ifdef __HIP_PLATFORM_AMD__`` or ``defined(A) || defined(B)`` of guards; NVIDIA for their
    negations; EITHER for anything that does not test a guard alone."""
    expr = expr.strip()
    if directive in ("ifdef", "ifndef"):
        if expr not in GUARDS:
            return EITHER
        return HIP if directive == "ifdef" else NVIDIA
    negated = expr.startswith("!")
    body = expr[1:].strip() if negated else expr
    wrapped = body.startswith("(") and _closing(body, 0) == len(body) - 1
    if wrapped:
        body = body[1:-1].strip()
    terms = [t.strip() for t in body.split("||")]
    if negated and len(terms) > 1 and not wrapped:
        return EITHER  # "!A || B" negates A alone
    for term in terms:
        m = re.fullmatch(r"defined\s*\(\s*(\w+)\s*\)|defined\s+(\w+)|(\w+)", term)
        if m is None or (m.group(1) or m.group(2) or m.group(3)) not in GUARDS:
            return EITHER
    return NVIDIA if negated else HIP


def regions(text: str) -> list[str]:
    """For each line of ``text`` (comments stripped), whether it is compiled for HIP only,
    NVIDIA only or either, from the preprocessor conditionals that test :data:`GUARDS`."""
    kinds = []
    stack: list[tuple[str, set[str]]] = []  # (this branch's kind, kinds of earlier branches)

    def current() -> str:
        inner = [k for k, _ in stack if k != EITHER]
        return inner[-1] if inner else EITHER

    for line in text.splitlines():
        m = _DIRECTIVE.match(line)
        if m is None:
            kinds.append(current())
            continue
        directive, expr = m.group(1), m.group(2)
        if directive in ("if", "ifdef", "ifndef"):
            stack.append((_guard_test(directive, expr), set()))
        elif directive in ("elif", "else") and stack:
            kind, seen = stack.pop()
            seen = seen | {kind}
            if HIP in seen:  # a later branch runs only where the guard is false: NVIDIA
                follow = NVIDIA
            elif NVIDIA in seen:
                follow = HIP
            else:
                follow = _guard_test("if", expr) if directive == "elif" else EITHER
            stack.append((follow, seen))
        elif directive == "endif" and stack:
            stack.pop()
        kinds.append(current())
    return kinds


def _first_instruction(body: str) -> str:
    body = body.replace("\\n", " ").strip()
    for stmt in body.split(";"):
        word = stmt.strip().split(" ")[0]
        if word and not word.startswith(".reg") and word != "mov.b32":
            return word
    return body.split(" ")[0] or "asm"


def _sites(name: str, text: str) -> list[tuple[Site, str]]:
    """Every NVIDIA-only construct of one file with the kind of code region it sits in."""
    code = strip_comments(text)
    kinds = regions(code)

    def line_of(pos: int) -> int:
        return code.count("\n", 0, pos) + 1

    found = []
    for m in _ASM.finditer(code):  # an asm( may open its string on the next line
        line = line_of(m.start())
        found.append((Site(name, line, f"inline PTX {_first_instruction(m.group(1))}"), kinds[line - 1]))
    for m in _INTRINSIC.finditer(code):
        line = line_of(m.start())
        found.append((Site(name, line, f"cache-hint intrinsic {m.group(1)}"), kinds[line - 1]))
    for m in _BF16.finditer(code):
        line = line_of(m.start())
        found.append((Site(name, line, "cuda_bf16.h (needs hip_bf16.h, ROCm >= 5.7)"), kinds[line - 1]))
    return sorted(found, key=lambda f: f[0].line)


def scan_text(name: str, text: str) -> list[Site]:
    """The sites of one source file's text that a HIP build would compile: NVIDIA-only code
    outside an NVIDIA-only branch (what blocks the port)."""
    return [site for site, kind in _sites(name, text) if kind == EITHER]


def guarded_text(name: str, text: str) -> list[Site]:
    """The sites of one file that sit in NVIDIA-only branches (an AMD alternative is beside them)."""
    return [site for site, kind in _sites(name, text) if kind == NVIDIA]


def _files(dist: str) -> list[Path]:
    return [p for p in sorted(csrc(dist).iterdir()) if p.suffix in (".cu", ".cuh", ".h", ".cpp")]


def scan(dist: str) -> list[Site]:
    """Every NVIDIA-only site of a distribution's shipped sources that blocks a HIP build."""
    return [s for path in _files(dist) for s in scan_text(path.name, path.read_text())]


def guarded(dist: str) -> list[Site]:
    """Every NVIDIA-only site of a distribution's sources that is compiled for NVIDIA only."""
    return [s for path in _files(dist) for s in guarded_text(path.name, path.read_text())]


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
            f"(each needs an AMD alternative under `#if GPTQ_HIP` in gptq-backend-{dist}, as "
            "gptq-backend-exllama's csrc/portable.cuh does)")
