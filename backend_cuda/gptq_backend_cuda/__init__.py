"""gptq-backend-cuda: CUDA C++ 2/3/4/8-bit kernels for gptq-core on NVIDIA GPUs (sm_75 and newer).

The CUDA sources ship in ``csrc/`` and are compiled on first use (``python -m
gptq_backend_cuda.build`` builds ahead of time); the backend registers itself through the
``gptq.backends`` entry point ``cuda``.
"""

__version__ = "0.1.0"
