"""A Hopper (sm_90a) wgmma main loop for 4-bit GPTQ GEMM (issue 17).

The marlin dispatch policy routes a layer's batched rows here (``policy.hopper_rows``: the
measured tables by layer size) when the layer carries a Hopper copy (the ``hopper_cache_mb``
option); ``benchmarks/hopper_check.py`` calls ``ops.prepare`` + ``ops.hopper_gemm`` directly
(NOTES/hopper-wgmma.md).
"""
