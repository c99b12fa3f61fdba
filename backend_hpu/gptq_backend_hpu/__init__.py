"""gptq-backend-hpu: GPTQ layers on Intel Gaudi through ``habana_frameworks.torch``.

Weights stay packed int4 on the HPU and are dequantized per call by Gaudi's own
``torch.ops.hpu.convert_from_uint4`` into a matmul. The layout conversion (``layout.py``) is
plain torch; everything that needs Gaudi lives in ``device_ops.py``. The backend registers
itself through the ``gptq.backends`` entry point ``hpu``.
"""

__version__ = "0.1.0"
