"""The ``triton`` backend: fused dequantize-in-registers GPTQ matmul for NVIDIA (sm80+) and AMD GPUs.

Every bit width (2, 3, 4, 8), sym and asym, act-order, fp16/bf16/fp32 activations with fp32
accumulation, bias fused. Modules: :mod:`.options` (the typed options), :mod:`.layout` (the
weights re-laid out once at pack time), :mod:`.configs` (launch configurations: default rules,
tuned tables, tuner candidates), :mod:`.dispatch` (the dispatch policy and workspace decided
when a layer is prepared), :mod:`.scratch` (the split-K workspace), :mod:`.target` (interpreter
or GPU), :mod:`.kernels` (the Triton kernels), :mod:`.launch` (worked-out launches and the
direct relaunch), :mod:`.ops` (the hot path, the custom op, choosing, tuning, fallbacks). On
the CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``), so CI checks the
kernels' arithmetic without a GPU. The package is not called ``triton`` so that
it never shadows the ``triton`` module.
"""
