"""Compile the triton backend's kernels for a GPU that is not here, and report what ptxas made.

No GPU needed: Triton compiles for a named target (default sm_90), and nvdisasm (shipped with
Triton) disassembles the cubin. Prints registers, spills, shared memory and the SASS
instruction histogram of each configuration, so a change to a kernel can be judged (16-byte
loads? HMMA or FFMA? how many integer ops per weight?) before spending GPU time.

    python benchmarks/triton_sass.py --bits 4 --group 128 --mode 0 --bm 16 --bn 64 --sk 4
    python benchmarks/triton_sass.py --all          # every tuner candidate, all bits (slow)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gptq_backends.triton_kernels import configs, kernels  # noqa: E402
from gptq_backends.triton_kernels.layout import sub_tile, tile_k  # noqa: E402

#: Shared memory one block may use on the H100 (sm_90), as Triton's OutOfResources reports it.
H100_SMEM = 232448
PTR_TYPES = {0: "*fp16", 1: "*bf16", 2: "*fp32"}
QMM_ARGS = (
    ("x_ptr", None), ("qw_ptr", "*i32"), ("qh_ptr", "*i32"), ("sc_ptr", "*fp16"),
    ("zr_ptr", "*i16"), ("bias_ptr", "*fp16"), ("out_ptr", None),
    ("part_ptr", "*fp32"), ("lock_ptr", "*i32"),
    ("M", "i32"), ("N", "i32"), ("K", "i32"), ("N_PAD", "i32"), ("TILES", "i32"),
    ("stride_xm", "i32"), ("stride_om", "i32"), ("SPLIT_K", "i32"), ("HAS_BIAS", "i32"),
)


def nvdisasm() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def compile_qmm(bits: int, group: int, dtype: str, cfg: configs.KernelConfig, *, const_zero=True,
                arch: int = 90, asm: bool = False):
    xt = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
    mode = {"fp16": 0, "bf16": 1 if bits <= 4 else 2, "fp32": 2}[dtype]
    signature, attrs = {}, {}
    for i, (name, ty) in enumerate(QMM_ARGS):
        signature[name] = ty or xt
        if name not in ("M", "K", "TILES", "SPLIT_K", "HAS_BIAS"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = dict(
        BITS=bits, S=sub_tile(group), GS=group, CONST_ZERO=const_zero, MODE=mode, EVEN_K=True,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE_DOT=dtype == "fp32",
    )
    if cfg.split_k == 1:  # Triton specializes an argument equal to 1 into a constant
        constexprs["SPLIT_K"] = 1
    constexprs["ASM"] = asm
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(kernels.qmm_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


OP_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


def histogram(text: str) -> collections.Counter:
    return collections.Counter(op for op in OP_RE.findall(text) if op != "NOP")


def main_loop(text: str) -> str:
    """The SASS of the longest loop (a backward conditional branch and its target)."""
    lines = text.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if line.startswith(".L_x_")}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"@!?P\w+\s+BRA\s+`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return "\n".join(lines[best[0]:best[1] + 1])


def ptxas_usage(ptx: str, arch: int = 90) -> str:
    """ptxas -v's resource line: registers, spill stores/loads, stack."""
    ptxas = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        target = f"-arch=sm_{arch}" + ("a" if arch == 90 else "")
        res = subprocess.run([ptxas, target, "-v", str(src), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return (f"regs {regs.group(1) if regs else '?'} spill-st/ld "
            f"{spills.group(1) if spills else '?'}/{spills.group(2) if spills else '?'} "
            f"stack {stack.group(1) if stack else '?'}")


def report(label: str, compiled, weights_per_iter: float | None = None) -> None:
    """Resources, and the main loop's instruction histogram (per weight and thread if given)."""
    md = compiled.metadata
    text = disassemble(compiled.asm["cubin"])
    loop = histogram(main_loop(text))
    n = sum(loop.values())
    per = f" = {n / weights_per_iter:.2f}/weight" if weights_per_iter else ""
    top = ", ".join(f"{op} {c}" for op, c in loop.most_common(14))
    over = (f" OVER the H100's {H100_SMEM} B: OutOfResources at launch (ops.run falls back)"
            if md.shared > H100_SMEM else "")
    print(f"{label}: {ptxas_usage(compiled.asm['ptx'])} smem {md.shared}{over}; "
          f"loop {n} instrs{per}\n    {top}")


def weights_per_thread(bits: int, group: int, cfg: configs.KernelConfig) -> float:
    """Weights one thread dequantizes per iteration of the K loop (one planar tile)."""
    return tile_k(bits, sub_tile(group)) * cfg.block_n / (32 * cfg.num_warps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--bm", type=int, default=16)
    ap.add_argument("--bn", type=int, default=128)
    ap.add_argument("--sk", type=int, default=1)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--asm", action=argparse.BooleanOptionalAction, default=None,
                    help="the inline-PTX single-LOP3 dequant (default: as the backend, on for "
                         "fp16 2/4/8-bit)")
    ap.add_argument("--all", action="store_true", help="compile every tuner candidate")
    ap.add_argument("--all-bits", default="4,2,3,8", help="bit widths for --all")
    args = ap.parse_args(argv)
    args.all_bits = [int(b) for b in args.all_bits.split(",")]

    def use_asm(dtype: str, bits: int) -> bool:
        if bits == 3:
            return False  # 3-bit has its own dequant sequence (ASM is ignored there)
        return args.asm if args.asm is not None else dtype == "fp16"

    if args.all:
        seen, failed = set(), 0
        for bits in args.all_bits:
            for dtype, cfg in itertools.product(("fp16",), (
                    c for m in (1, 32, 64, 256) for c in configs.candidates(m, 4096, 4096, bits))):
                if cfg.path != "fused":
                    continue
                for split in ((1, 2) if cfg.split_k == 0 else (cfg.split_k,)):
                    c = configs.KernelConfig("fused", cfg.block_m, cfg.block_n, split,
                                             cfg.num_warps, cfg.num_stages)
                    if (bits, dtype, c) in seen:
                        continue
                    seen.add((bits, dtype, c))
                    label = f"b{bits} {dtype} {c.label()}{' asm' if use_asm(dtype, bits) else ''}"
                    try:
                        report(label, compile_qmm(bits, 128, dtype, c, asm=use_asm(dtype, bits)),
                               weights_per_thread(bits, 128, c))
                    except Exception as exc:  # noqa: BLE001
                        failed += 1
                        print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        print(f"{len(seen)} configurations, {failed} failed")
        return 1 if failed else 0
    cfg = configs.KernelConfig("fused", args.bm, args.bn, args.sk, args.warps, args.stages)
    asm = use_asm(args.dtype, args.bits)
    report(f"b{args.bits} g{args.group} {args.dtype} {cfg.label()}{' asm' if asm else ''}"
           f"{' asym' if args.asym else ''}",
           compile_qmm(args.bits, args.group, args.dtype, cfg, const_zero=not args.asym, asm=asm),
           weights_per_thread(args.bits, args.group, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
