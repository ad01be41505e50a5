"""BatchNorm2d in CUDA (one load_inline module) and Triton, behind one interface.

>>> from kernels import BatchNorm2d, batch_norm, convert
"""
from .cuda_kernels import CudaConfig
from .functional import BACKENDS, DTYPES, batch_norm, bytes_moved, normalize, output_like
from .module import BatchNorm2d, convert
from .triton_kernels import TritonConfig

__all__ = ["BACKENDS", "DTYPES", "BatchNorm2d", "CudaConfig", "TritonConfig", "batch_norm", "bytes_moved", "convert",
           "normalize", "output_like"]
