"""Training mode's batch statistics against float64: mean, biased variance, running-stat updates."""
import pytest
import torch
from conftest import DEVICE, SHAPES, make_layout

from kernels import batch_norm
from kernels.reference import relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def reference_stats(x):
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    return mean, var


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] * s[2] * s[3] > 1], ids=lambda s: "x".join(map(str, s)))
def test_running_stats_match_float64(shape, dtype, layout):
    """The statistics of x as stored (so the input's dtype does not count), updated into float32 buffers."""
    x = make_layout((torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype), layout)
    c = shape[1]
    running_mean, running_var = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    old_mean, old_var = running_mean.double(), running_var.double()
    batch_norm(x, running_mean, running_var, training=True, momentum=0.25, backend="triton")
    if x.numel() == 0:
        return
    mean, var = reference_stats(x)
    n = x.numel() // c
    assert relative_error(running_mean, 0.75 * old_mean + 0.25 * mean) <= 1e-6
    assert relative_error(running_var, 0.75 * old_var + 0.25 * var * n / (n - 1)) <= 1e-6


def test_variance_survives_a_large_mean():
    """A mean 10^4 times the spread: a sum of squares in float32 would lose the variance entirely."""
    x = torch.rand(8, 4, 64, 64, device=DEVICE) + 1e4
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    batch_norm(x, running_mean, running_var, training=True, momentum=1.0, backend="triton")
    mean, var = reference_stats(x)
    n = x.numel() // 4
    assert relative_error(running_var, var * n / (n - 1)) <= 1e-4
