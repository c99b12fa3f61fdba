"""The ``cpu`` backend: GPTQ weights dequantized in registers by a C++ kernel (AVX-512, AVX2
or plain C++, chosen at run time), built on first use; torch's own kernels where that fails."""
