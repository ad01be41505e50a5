"""Training mode against float64: the output normalised by the batch statistics, and the running statistics."""
import pytest
import torch
from conftest import BACKENDS, DEVICE, HAS_GPU, SHAPES, TOLERANCE, gpu, make_layout, make_params

from bn2d import CudaConfig, batch_norm, cuda_module, dispatch, explain, functional, output_like, triton_kernels
from bn2d.reference import batch_norm_error, batch_stats_reference, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TRAINING_BACKENDS = [b for b in BACKENDS if b != "cuda_naive"]  # the naive kernel is eval only


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] * s[2] * s[3] > 1], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_training_matches_float64(backend, shape, dtype, layout):
    """y from the batch statistics of x as stored (so the input's dtype does not count), and the running
    statistics moved towards them in float32 buffers; y is poisoned first, so an unwritten element fails."""
    x = make_layout((torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype), layout)
    params = make_params(shape[1])
    old = [p.clone() for p in params[:2]]
    out = output_like(x).fill_(float("nan"))
    batch_norm(x, *params, training=True, momentum=0.25, backend=backend, out=out)
    if x.numel():
        check_training(out, x, *old, *params, momentum=0.25)


def check_training(y, x, old_mean, old_var, running_mean, running_var, weight, bias, momentum):
    """y normalised by x's float64 batch statistics; the running statistics moved from the old ones."""
    mean, var = batch_stats_reference(x)
    n = x.numel() // x.size(1)
    assert batch_norm_error(y, x, mean, var, weight, bias) <= TOLERANCE[x.dtype]
    expected_mean = (1 - momentum) * old_mean.double() + momentum * mean
    expected_var = (1 - momentum) * old_var.double() + momentum * var * n / (n - 1)
    assert relative_error(running_mean, expected_mean) <= 1e-6
    assert relative_error(running_var, expected_var) <= 1e-6


@pytest.mark.parametrize("shape", [(8, 4, 64, 64), (8, 4, 16, 16)], ids=["three_kernels", "one_kernel"])
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_variance_survives_a_large_mean(backend, shape):
    """A mean 10^4 times the spread: a sum of squares in float32 would lose the variance entirely."""
    x = torch.rand(shape, device=DEVICE) + 1e4
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


def test_triton_finalize_over_several_steps(monkeypatch):
    """Triton's finalize takes FINALIZE_PARTS pieces of FINALIZE_CHANNELS channels at a time: with 2 pieces a
    step, three pieces of 20 channels (channels_last, 768 rows) need two steps in each of three programs."""
    monkeypatch.setattr(triton_kernels, "FINALIZE_PARTS", 2)
    x = make_layout(torch.randn(12, 20, 8, 8, device=DEVICE) * 2 + 3, "channels_last")
    mean, var = triton_kernels.batch_stats(x, None, None, 0.1, dispatch.triton_train(x, fused=False))
    expected_mean, expected_var = batch_stats_reference(x)
    assert relative_error(mean, expected_mean) <= 1e-6
    assert relative_error(var, expected_var) <= 1e-6


# The one-kernel paths. A block per channel: planes of whole 16-byte vectors, of 8-byte ones (5x6 planes in
# float32, 14x14 in 16-bit types) or neither, one element per plane, every dtype. The persistent grid
# (float32): fewer vectors than blocks, a channel that fits on chip, and channels larger than an H100 holds on
# chip (their tails are read twice).
CHANNEL_CASES = [(shape, dtype) for shape in [(2, 3, 4, 4), (2, 3, 5, 6), (4, 16, 14, 14), (4, 6, 7, 7), (3, 5, 13, 17),
                                              (64, 4, 1, 1), (8, 3, 56, 56)]
                 for dtype in DTYPES]
# channels_last, a block per group of channels: fewer channels than a group, whole and partial groups of
# vectors and of elements, 1x1 planes (NCHW is channels_last there), an odd channel count.
GROUP_CASES = [(shape, dtype) for shape in [(2, 3, 4, 4), (4, 16, 7, 7), (3, 20, 5, 6), (64, 4, 1, 1), (2, 9, 13, 17)]
               for dtype in DTYPES]
GRID_CASES = [(shape, torch.float32) for shape in [(2, 3, 4, 4), (4, 5, 36, 36), (8, 3, 512, 512), (48, 2, 512, 512),
                                                   (3, 2, 2048, 2052)]]


def _fits_triton(shape, layout="nchw"):
    x = make_layout(torch.empty(shape, device="meta"), layout)
    return len(dispatch.triton_train(x).kernels) == 1


ONE_KERNEL_CASES = [("triton", "channel", *c) for c in CHANNEL_CASES if _fits_triton(c[0])] + [
    ("triton", "group", *c) for c in GROUP_CASES if _fits_triton(c[0], "channels_last")] + (
    [("cuda", "channel", *c) for c in CHANNEL_CASES] + [("cuda", "group", *c) for c in GROUP_CASES] +
    [("cuda", "grid", *c) for c in GRID_CASES] if HAS_GPU else [])


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("backend, kernel, shape, dtype", ONE_KERNEL_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).removeprefix("torch."))
def test_one_kernel_training_matches_float64(backend, kernel, shape, dtype, affine):
    x = (torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype)
    if kernel == "group":
        x = x.contiguous(memory_format=torch.channels_last)
    params = make_params(shape[1], affine=affine)
    old = [p.clone() for p in params[:2]]
    y = torch.full_like(x, float("nan"))
    name = {"channel": "channel_kernel", "group": "channel_group_kernel", "grid": "fused_nchw_kernel"}[kernel]
    if backend == "cuda":
        cuda_module.fused_training(x, y, *params[2:], *params[:2], 0.25, 1e-5, dispatch.cuda_train_plan(x, y, name))
    else:
        triton_kernels.fused_training(x, y, *params[2:], *params[:2], 0.25, 1e-5, dispatch.triton_train_plan(x, name))
    check_training(y, x, *old, *params, momentum=0.25)


@gpu
@pytest.mark.parametrize("fused", [1, 0], ids=["one_kernel", "three_kernels"])
def test_batch_norm_training_paths(fused):
    """batch_norm's CUDA training path with one kernel forced on and off, with and without running
    statistics."""
    x = torch.randn(4, 6, 20, 20, device="cuda")
    params = make_params(6)
    config = CudaConfig(fused=fused)
    assert explain(x, *params, training=True, config=config)[0].kernels[0] == (
        "channel_kernel" if fused else "nchw_stats_kernel")
    old = [p.clone() for p in params[:2]]
    y = batch_norm(x, *params, training=True, momentum=0.5, config=config)
    check_training(y, x, *old, *params, momentum=0.5)
    y = batch_norm(x, None, None, *params[2:], training=True, config=config)
    mean, var = batch_stats_reference(x)
    assert batch_norm_error(y, x, mean, var, *params[2:]) <= TOLERANCE[torch.float32]


def test_read_once_rule():
    """A block per channel up to CHANNEL_BLOCK_BYTES (channels_last: a block per group of channels, 32 bytes
    of each row, given at least GROUP_MIN_BLOCKS groups), the grid for large float32 NCHW channels, else three
    kernels."""
    def rule(shape, dtype=torch.float32, layout="nchw", fused=-1):
        x = make_layout(torch.empty(shape, dtype=dtype, device="meta"), layout)
        kernels = dispatch.cuda_train(x, config=CudaConfig(fused=fused)).kernels
        return {"channel_kernel": "channel", "channel_group_kernel": "group", "fused_nchw_kernel": "grid"}.get(
            kernels[0], "")

    assert rule((32, 2048, 7, 7)) == rule((32, 2048, 7, 7), torch.float16) == "channel"
    assert rule((32, 2048, 7, 7), fused=0) == rule((32, 2048, 7, 7), fused=0, layout="channels_last") == ""
    assert rule((32, 2048, 7, 7), layout="channels_last") == rule((32, 512, 7, 7), layout="channels_last") == "group"
    assert rule((32, 2048, 14, 14), layout="channels_last") == rule((32, 64, 7, 7), layout="channels_last") == ""
    assert rule((32, 512, 7, 7), torch.float16, "channels_last") == ""  # 32 groups of 16 channels: too few
    assert f"constexpr int GROUP_BYTES = {dispatch.GROUP_BYTES};" in cuda_module.CUDA_SOURCE
    assert rule((32, 256, 56, 56)) == "" and rule((32, 256, 56, 56), fused=1) == "grid"
    assert rule((64, 64, 512, 512)) == "grid" and rule((64, 64, 512, 512), torch.float16) == ""
    assert _fits_triton((32, 2048, 14, 14)) and not _fits_triton((32, 256, 28, 28))
    assert _fits_triton((32, 2048, 7, 7), "channels_last") and not _fits_triton((32, 2048, 14, 14), "channels_last")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(4, 16, 9, 9), (2, 1024, 3, 3), (8, 4, 64, 65)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
def test_saved_statistics(monkeypatch, backend, shape, dtype, layout):
    """The batch mean and biased variance a training forward keeps for the backward (`save`), from whichever
    kernels each case's plan runs (between them both backends' read-once kernels and three-kernel paths; CUDA's
    group kernel needs the 1024 channels), poisoned first: float32 (float64 for float64 input), within 1e-5 of
    float64's."""
    if backend == "torch":
        pytest.skip("PyTorch keeps its own")
    stats_like = functional._stats_like
    monkeypatch.setattr(functional, "_stats_like", lambda x: tuple(t.fill_(float("nan")) for t in stats_like(x)))
    x = make_layout((torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype), layout)
    params = make_params(shape[1])
    y = torch.empty_like(x)
    mean, var = functional._train(x, y, params[2], params[3], *params[:2], 0.1, 1e-5, backend,
                                  functional._config(backend, None), save=True)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = batch_stats_reference(x)
    assert relative_error(mean, expected[0]) <= 1e-5 and relative_error(var, expected[1]) <= 1e-5
