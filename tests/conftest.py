"""Test set-up. Without a GPU, Triton runs in its interpreter on CPU tensors and the CUDA module is
compiled for sm_80 and sm_90 without a device to detect; both need their variables set before import."""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

# The device tests run on: CUDA with a GPU, else CPU tensors through the Triton interpreter.
DEVICE = "cuda" if HAS_GPU else "cpu"

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

# Kernel backends exercised here: on a GPU all of them; on CPU the Triton interpreter.
BACKENDS = ["cuda", "cuda_naive", "triton"] if HAS_GPU else ["triton"]

# Relative L2 error bounds against the float64 reference.
# float64: Triton passes eps as a float32 scalar, which alone moves the result by up to ~1e-10.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}

# (N, C, H, W): 1x1 and 7x7 planes, odd sizes, an empty batch, and planes that are and are not a whole
# number of 16-byte vectors.
SHAPES = [(1, 1, 1, 1), (3, 5, 1, 1), (2, 3, 7, 7), (2, 4, 13, 17), (0, 3, 5, 5), (4, 16, 14, 14),
          (2, 24, 8, 8), (1, 32, 56, 56)]


def make_layout(x, layout):
    """x in one of the tested memory layouts (same values)."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


def make_params(channels, dtype=torch.float32, device=DEVICE, affine=True):
    """Random mean, var (> 0), weight and bias: never zeros or ones, so a dropped term shows."""
    mean = torch.randn(channels, device=device).to(dtype)
    var = (torch.rand(channels, device=device) + 0.5).to(dtype)
    if not affine:
        return mean, var, None, None
    return mean, var, torch.randn(channels, device=device).to(dtype), torch.randn(channels, device=device).to(dtype)


def pytest_report_header(config):
    from experiments.environment import capture

    return [f"bn2d environment: {', '.join(f'{k}={v}' for k, v in capture().items())}"]
