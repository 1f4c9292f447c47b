"""Low-bit matmul kernels for post-training quantized inference (zoo.research.quamba2)."""
from .w4a16 import w4a16_matmul_triton

__all__ = ["w4a16_matmul_triton"]
