"""The ``torch`` backend: plain PyTorch, every bit width and device; the numerical reference.

Each call dequantizes the weight in chunks of input rows and accumulates ``x_chunk @ w_chunk``
in float32, so at most one chunk of the layer is ever dequantized at a time.
"""
