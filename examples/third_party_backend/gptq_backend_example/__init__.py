"""An example third-party gptq-core backend (``example``), written against the public API only.

4- and 8-bit GPTQ weights on the CPU: unpacked once to int8 at load, groups made contiguous
(act-order rows sorted by group), computed group by group in float32 through the custom op
``gptq_example::grouped_matmul``.
"""
