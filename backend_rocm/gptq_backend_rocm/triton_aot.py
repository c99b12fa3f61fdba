"""Ahead-of-time compilation of the triton backend's kernels for AMD GPUs, with no GPU present.

``compile_qmm`` hands ``qmm_kernel`` (the fused dequantize-and-multiply of
``gptq_backends.triton_kernels``) to Triton's AMD backend for an explicit
``GPTTarget("hip", arch, 64)``: Triton lowers it to AMDGCN and links a code object with the
``ld.lld`` it ships, so CI proves that the AMD default configurations (``configs.AMD_DEFAULT_RULES``)
compile for gfx90a (MI200) and gfx942 (MI300) and fit the 64 KiB of LDS those GPUs have,
without a ROCm driver or device (docs/DESIGN.md §1: AMD GPUs are served by tuned Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Wavefront size of CDNA GPUs (Instinct MI100/MI200/MI300): 64 lanes.
CDNA_WAVE = 64
#: LDS per workgroup on gfx90a and gfx942 (gfx950 has 160 KiB).
CDNA_LDS_BYTES = 64 * 1024
#: The Instinct architectures CI compiles for.
CI_ARCHS = ("gfx90a", "gfx942")

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


@dataclass(frozen=True)
class Compiled:
    """What Triton produced for one configuration: code object size, LDS and register use."""

    arch: str
    hsaco_bytes: int
    shared_bytes: int
    amdgcn: str

    @property
    def uses_mfma(self) -> bool:
        """Whether the assembly multiplies with the matrix cores (v_mfma instructions)."""
        return "v_mfma" in self.amdgcn


def qmm_signature(act: str = "float16") -> dict[str, str]:
    """Argument types of ``qmm_kernel`` as ``launch.Plan`` passes them (4-bit, no 3-bit plane:
    its pointer is the int32 ticket buffer, as at run time)."""
    x = _PTR[act]
    sig = {"x_ptr": x, "qw_ptr": "*i32", "qh_ptr": "*i32", "sc_ptr": "*fp16", "zr_ptr": "*i16",
           "bias_ptr": x, "out_ptr": x, "part_ptr": "*fp32", "lock_ptr": "*i32"}
    for name in ("M", "N", "K", "N_PAD", "TILES", "stride_xm", "stride_om", "SPLIT_K", "HAS_BIAS"):
        sig[name] = "i32"
    return sig


def compile_qmm(arch: str, block_m: int, block_n: int, num_warps: int, num_stages: int,
                bits: int = 4, group_size: int = 128, act: str = "float16",
                const_zero: bool = True) -> Compiled:
    """Compile one fused-kernel configuration for ``arch`` (e.g. "gfx942"); raises Triton's own
    error when it cannot (an unknown architecture, a tile that does not lower)."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    from gptq_backends.triton_kernels import kernels  # noqa: PLC0415
    from gptq_backends.triton_kernels.layout import SUB_TILES  # noqa: PLC0415

    sub = SUB_TILES[0]
    mode = {"float16": 0, "bfloat16": 1, "float32": 2}[act]
    constexprs = {
        "BITS": bits, "S": sub, "GS": group_size, "CONST_ZERO": const_zero, "MODE": mode,
        "EVEN_K": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "IEEE_DOT": act == "float32", "ASM": False,  # the inline-PTX dequant is CUDA-only
    }
    signature = qmm_signature(act)
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=kernels.qmm_kernel, signature=signature,
                                    constexprs={(kernels.qmm_kernel.arg_names.index(k),): v
                                                for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("hip", arch, CDNA_WAVE),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return Compiled(arch=arch, hsaco_bytes=len(compiled.asm["hsaco"]),
                    shared_bytes=int(compiled.metadata.shared), amdgcn=compiled.asm["amdgcn"])
