"""gptq-backend-marlin: Marlin-class int4/int8 tensor-core kernels for gptq-core on NVIDIA sm80+.

The CUDA sources ship in ``csrc/`` and are compiled on first use (``python -m
gptq_backend_marlin.build`` builds ahead of time); the backend registers itself through the
``gptq.backends`` entry point ``marlin``.
"""

__version__ = "0.1.0"
