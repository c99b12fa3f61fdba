"""gptq-backend-exllama: ExLlama-style 4-bit kernels for gptq-core on NVIDIA GPUs (sm_60+ where
the CUDA toolkit still builds for them; sm_75+ under CUDA 13).

The CUDA sources ship in ``csrc/`` and are compiled on first use (``python -m
gptq_backend_exllama.build`` builds ahead of time); the backend registers itself through the
``gptq.backends`` entry point ``exllama``.
"""

__version__ = "0.1.0"
