"""Training mode against float64: the output normalised by the batch statistics, and the running statistics."""
import pytest
import torch
from conftest import BACKENDS, DEVICE, SHAPES, TOLERANCE, make_layout, make_params

from kernels import batch_norm, output_like
from kernels.reference import batch_norm_error, batch_stats_reference, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TRAINING_BACKENDS = [b for b in BACKENDS if b != "cuda_naive"]  # the naive kernel is eval only


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] * s[2] * s[3] > 1], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_training_matches_float64(backend, shape, dtype, layout):
    """y from the batch statistics of x as stored (so the input's dtype does not count), and the running
    statistics moved towards them in float32 buffers; y is poisoned first, so an unwritten element fails."""
    x = make_layout((torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype), layout)
    c = shape[1]
    running_mean, running_var, weight, bias = make_params(c)
    old_mean, old_var = running_mean.double(), running_var.double()
    out = output_like(x).fill_(float("nan"))
    batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum=0.25, backend=backend, out=out)
    if x.numel() == 0:
        return
    mean, var = batch_stats_reference(x)
    n = x.numel() // c
    assert batch_norm_error(out, x, mean, var, weight, bias) <= TOLERANCE[dtype]
    assert relative_error(running_mean, 0.75 * old_mean + 0.25 * mean) <= 1e-6
    assert relative_error(running_var, 0.75 * old_var + 0.25 * var * n / (n - 1)) <= 1e-6


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_variance_survives_a_large_mean(backend):
    """A mean 10^4 times the spread: a sum of squares in float32 would lose the variance entirely."""
    x = torch.rand(8, 4, 64, 64, device=DEVICE) + 1e4
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    batch_norm(x, running_mean, running_var, training=True, momentum=1.0, backend=backend)
    mean, var = batch_stats_reference(x)
    n = x.numel() // 4
    assert relative_error(running_var, var * n / (n - 1)) <= 1e-4


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_half_running_statistics(backend):
    """Buffers in the input's dtype (a module converted with .half()) are read and written in that dtype."""
    x = torch.randn(4, 8, 9, 9, device=DEVICE).half()
    running_mean, running_var = torch.randn(8, device=DEVICE).half(), (torch.rand(8, device=DEVICE) + 0.5).half()
    expected_mean = 0.9 * running_mean.double() + 0.1 * batch_stats_reference(x)[0]
    batch_norm(x, running_mean, running_var, training=True, momentum=0.1, backend=backend)
    assert running_mean.dtype == torch.float16
    assert relative_error(running_mean, expected_mean) <= 1e-3
