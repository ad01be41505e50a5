"""BatchNorm2d in CUDA (one load_inline module) and Triton, behind one interface.

>>> from bn2d import BatchNorm2d, batch_norm, convert, explain
"""
from .dispatch import CudaConfig, Plan, TritonConfig
from .functional import BACKENDS, DTYPES, batch_norm, bytes_moved, explain, normalize, output_like
from .module import BatchNorm2d, BatchNormAddReLU2d, BatchNormReLU2d, convert

__all__ = ["BACKENDS", "DTYPES", "BatchNorm2d", "BatchNormAddReLU2d", "BatchNormReLU2d", "CudaConfig", "Plan",
           "TritonConfig", "batch_norm", "bytes_moved", "convert", "explain", "normalize", "output_like"]
