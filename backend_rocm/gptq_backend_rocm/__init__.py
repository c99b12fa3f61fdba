"""gptq-backend-rocm: AMD GPUs through PyTorch's ROCm builds (docs/DESIGN.md §1)."""

__version__ = "0.1.0"
