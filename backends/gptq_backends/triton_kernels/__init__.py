"""The ``triton`` backend: fused dequantize-in-registers GPTQ matmul for NVIDIA (sm80+) and AMD GPUs.

Every bit width (2, 3, 4, 8), sym and asym, act-order, fp16/bf16/fp32 activations with fp32
accumulation, bias fused. The weights are re-laid out once at pack time (:mod:`.layout`); the
kernels live in :mod:`.kernels`, the shape-aware dispatch and tuning in :mod:`.configs` and
:mod:`.ops`. On the CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``), so
CI checks the kernels' arithmetic without a GPU. The package is not called ``triton`` so that
it never shadows the ``triton`` module.
"""
