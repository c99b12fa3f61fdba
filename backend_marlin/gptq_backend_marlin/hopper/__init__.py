"""A Hopper (sm_90a) wgmma main loop for 4-bit GPTQ GEMM (issue 17), first version.

Not yet reached by the marlin dispatch policy: ``ops.prepare`` + ``ops.hopper_gemm`` are called
directly by ``benchmarks/hopper_check.py`` (NOTES/hopper-wgmma.md).
"""
