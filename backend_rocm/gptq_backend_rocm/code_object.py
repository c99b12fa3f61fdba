"""Reading an AMD GPU code object (the ELF hipcc writes per gfx target) with LLVM's tools.

What the compile tests check without a GPU: which kernels a code object holds, their
resources from the AMDGPU metadata note (VGPRs, spills, scratch, LDS, wave size) and their
instructions (``llvm-objdump -d``). Debian's hipcc depends on llvm-15, which ships
``llvm-readelf-15`` and ``llvm-objdump-15``; a ROCm install has them unversioned in
``$ROCM_PATH/llvm/bin``.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import hip_build

_ROCM_LLVM = ("/opt/rocm/llvm/bin",)


def llvm_tool(name: str) -> str | None:
    """``name`` (e.g. "llvm-readelf") of the LLVM that hipcc's clang belongs to
    (``llvm-readelf-15`` for Debian's clang 15), else ROCm's own, else the one on PATH. An
    older LLVM may not know the newer targets: Debian's llvm-objdump 14 aborts on gfx940."""
    major = hip_build.clang_major()
    found = shutil.which(f"{name}-{major}") if major else None
    for folder in _ROCM_LLVM:
        found = found or shutil.which(name, path=folder)
    return found or shutil.which(name)


@dataclass(frozen=True)
class Kernel:
    """One kernel's entry of the AMDGPU metadata note."""

    name: str
    vgprs: int
    agprs: int
    sgprs: int
    vgpr_spills: int
    sgpr_spills: int
    scratch_bytes: int       # private segment per work-item: spills and local arrays
    lds_bytes: int           # group segment: the kernel's shared memory
    wavefront: int
    max_workgroup: int


_KEYS = {".vgpr_count": "vgprs", ".agpr_count": "agprs", ".sgpr_count": "sgprs",
         ".vgpr_spill_count": "vgpr_spills", ".sgpr_spill_count": "sgpr_spills",
         ".private_segment_fixed_size": "scratch_bytes", ".group_segment_fixed_size": "lds_bytes",
         ".wavefront_size": "wavefront", ".max_flat_workgroup_size": "max_workgroup"}


def parse_kernels(notes: str) -> list[Kernel]:
    """The kernels of ``llvm-readelf --notes`` output (the YAML of ``amdhsa.kernels``)."""
    kernels = []
    item_indent = None
    fields: dict[str, object] = {}

    def close() -> None:
        if "name" in fields:
            kernels.append(Kernel(**{"agprs": 0, **fields}))  # gfx908 and older have no AGPR key

    for line in notes.splitlines():
        m = re.match(r"^(\s*)- (\.\w+):", line)
        if m and (item_indent is None or len(m.group(1)) == item_indent):
            item_indent = len(m.group(1))
            close()
            fields = {}
        kv = re.match(r"^\s*(?:- )?(\.\w+):\s+(\S+)\s*$", line)
        if kv is None or item_indent is None:
            continue
        key, value = kv.groups()
        indent = len(line) - len(line.lstrip(" -"))
        if indent != item_indent + 2:  # a nested entry (.args): not the kernel's own
            continue
        if key == ".name":
            fields["name"] = value
        elif key in _KEYS:
            fields[_KEYS[key]] = int(value)
    close()
    return kernels


def kernels(code_object: Path) -> list[Kernel]:
    """Every kernel of a code object, from its metadata note."""
    tool = llvm_tool("llvm-readelf")
    if tool is None:
        raise FileNotFoundError("llvm-readelf not found: apt-get install -y llvm-15 (hipcc depends on it)")
    out = subprocess.run([tool, "--notes", str(code_object)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return parse_kernels(out)


def instruction_counts(code_object: Path, arch: str) -> dict[str, collections.Counter]:
    """Per kernel symbol, how often each instruction (its mnemonic, e.g. ``v_pk_fma_f16``)
    occurs in the disassembly."""
    tool = llvm_tool("llvm-objdump")
    if tool is None:
        raise FileNotFoundError("llvm-objdump not found: apt-get install -y llvm-15 (hipcc depends on it)")
    text = subprocess.run([tool, "-d", f"--mcpu={arch}", str(code_object)], capture_output=True,
                          text=True, check=True, timeout=300).stdout
    out = {}
    for body in re.split(r"\n(?=[0-9a-f]+ <)", text):
        m = re.match(r"[0-9a-f]+ <([^>]+)>:", body)
        if m is None:
            continue
        ops = collections.Counter()
        for line in body.splitlines()[1:]:
            line = line.strip()
            if line and not line.startswith("//"):
                ops[line.split()[0]] += 1
        out[m.group(1)] = ops
    return out


def instruction_lines(code_object: Path, arch: str, symbol: str) -> list[str]:
    """The disassembled lines of one kernel (operands included, e.g. ``glc slc`` cache bits)."""
    tool = llvm_tool("llvm-objdump")
    text = subprocess.run([tool or "llvm-objdump", "-d", f"--mcpu={arch}", str(code_object)],
                          capture_output=True, text=True, check=True, timeout=300).stdout
    for body in re.split(r"\n(?=[0-9a-f]+ <)", text):
        if body.split("\n", 1)[0].endswith(f"<{symbol}>:"):
            return [ln.split("//")[0].strip() for ln in body.splitlines()[1:] if ln.strip()]
    return []
