"""The CUDA backward (bn2d.cuda_backward) on a GPU against float64 autograd of F.batch_norm: dx, dweight and
dbias, training and frozen, every dtype and layout, both kernel paths (three kernels, and the one that reads dy
and x once), only the gradients asked for, misaligned tensors, tensors past 2^31 elements, streams.

Each gradient's relative L2 error must be within 2x PyTorch's own (F.batch_norm's backward on CUDA in the
input's dtype, on the same inputs) or within TOLERANCE of the gradient's dtype, whichever is larger. Outputs are
poisoned: the wrapper's allocations come NaN-filled (`poisoned`), and so, as far as the caching allocator
allows, does the C++ side's workspace (`poison_allocator`), so an element a kernel should write and does not
fails (relative_error is inf on NaN). The rule (`backward_kernel`) is pinned on meta tensors, without a GPU."""
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_GPU, TOLERANCE, gpu, make_layout, make_params

from bn2d import Plan, cuda_backward, dispatch
from bn2d.reference import batch_stats_reference, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
EPS = 1e-5
# (shape, why). The read-once kernels fit all but "too_big" (in every dtype and layout).
SHAPES = [
    ((8, 16, 1, 1), "1x1"),  # NCHW is NHWC memory
    ((3, 5, 1, 1), "1x1_odd_channels"),  # channels_last single elements, a partial group
    ((4, 24, 7, 7), "7x7"),  # planes not a whole number of vectors; 16-bit groups of 16 channels, one partial
    ((2, 6, 13, 17), "13x17"),  # odd planes
    ((4, 16, 14, 14), "14x14"),  # 16-bit NCHW: 8-byte vectors
    ((2, 8, 48, 48), "fits"),  # read once in several steps per thread
    ((8, 4, 64, 64), "too_big"),  # for the read-once kernels: three kernels, several pieces per channel
    ((2, 1024, 7, 7), "many_groups"),  # the rule's group kernel (16-bit: 64 groups)
    ((3, 1030, 5, 5), "odd_channels"),  # channels_last rows not a whole number of 16-byte vectors
]
PATHS = ["three_kernels", "read_once"]


def _id(value):
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


class _PoisonedTorch:
    """torch, with empty and empty_like returning NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(cuda_backward, "torch", _PoisonedTorch())


def poison_allocator(device="cuda"):
    """Freed NaN-filled blocks of 512 bytes to 1 MB (the caching allocator's small pool), so the workspace the
    bound call allocates next most likely starts as NaNs: an unwritten partial sum or coefficient shows."""
    blocks = [torch.full((128 << k,), float("nan"), device=device) for k in range(12)]
    del blocks


NAMES = {"channel": "channel_backward_kernel", "group": "channel_group_backward_kernel"}


def plan(layout, kernel):
    """A backward plan that forces `kernel` ("channel", "group", or "" for three kernels) on `layout`."""
    kernels = (NAMES[kernel],) if kernel else (f"{layout}_backward_reduce_kernel", "backward_finalize_kernel",
                                               f"{layout}_backward_elementwise_kernel")
    return Plan("cuda", "backward", layout, kernels, {}, "forced by the test")


def read_once_kernel(x, layout):
    """The read-once kernel for x wherever its dy and x fit (the rule's thresholds, without its minimum of
    groups), else ""."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        return "group" if 2 * n * h * w * dispatch.GROUP_BYTES <= dispatch.BACKWARD_BLOCK_BYTES else ""
    return "channel" if 2 * n * h * w * x.element_size() <= dispatch.BACKWARD_BLOCK_BYTES else ""


def kernel_for(x, layout, path):
    if path == "three_kernels":
        return ""
    kernel = read_once_kernel(x, layout)
    if not kernel:
        pytest.skip("dy and x do not fit in a block's shared memory")
    return kernel


def make_inputs(shape, dtype, layout, training, affine, param_dtype=None):
    """dy, x (mean 3, spread 2, laid out as `layout`), the statistics the forward would have used (x's batch
    statistics in float32, float64 for float64; else random running ones in `param_dtype`), weight (None unless
    affine) and bias (x's dtype without a weight). param_dtype: float32, float64 for float64 input."""
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    x = make_layout((torch.randn(shape, device="cuda") * 2 + 3).to(dtype), layout)
    dy = make_layout(torch.randn(shape, device="cuda").to(dtype), layout)
    mean, var, weight, bias = make_params(shape[1], param_dtype, device="cuda")
    if training:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        mean, var = (s.to(acc) for s in batch_stats_reference(x))
    return dy, x, mean, var, weight if affine else None, bias if affine else bias.to(dtype)


def reference_grads(dy, x, mean, var, weight, bias, training, dtype=torch.float64):
    """(dx, dweight, dbias) by autograd of F.batch_norm in `dtype` (float64: the reference) with the given
    statistics (training: x's own). In another dtype, PyTorch's own on CUDA; its bias is then dropped without
    a weight (a 16-bit bias beside float32 statistics is not a combination PyTorch takes), so dbias is None.
    A bias without a weight takes a weight of ones (not differentiated): PyTorch's CUDA backward returns an empty
    gradient for such a bias (2.11)."""
    if dtype != torch.float64 and weight is None:
        bias = None
    cast = (lambda t: t.double()) if dtype == torch.float64 else (lambda t: t)
    x = cast(x).detach().requires_grad_()
    params = [None if p is None else cast(p).detach().requires_grad_() for p in (weight, bias)]
    stats = (None, None) if training else (cast(mean), cast(var))
    ones = torch.ones_like(params[1]) if params[0] is None and params[1] is not None else None
    y = F.batch_norm(x, *stats, params[0] if ones is None else ones, params[1], training, 0.0, EPS)
    inputs = [t for t in (x, *params) if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, cast(dy)))
    return [next(grads) if t is not None else None for t in (x, *params)]


def check_grads(got, dy, x, mean, var, weight, bias, training, needs):
    """Each gradient asked for within max(2x PyTorch's own error, TOLERANCE of its dtype) of float64 (float64
    input: TOLERANCE alone); the others None; dx with x's strides, dweight in weight's dtype, dbias in weight's
    (x's without a weight)."""
    expected = reference_grads(dy, x, mean, var, weight, bias, training)
    own = reference_grads(dy, x, mean, var, weight, bias, training, x.dtype) if x.dtype != torch.float64 else [None] * 3
    for name, g, ref, mine, need in zip(("dx", "dweight", "dbias"), got, expected, own, needs):
        if not need or ref is None:
            assert g is None, f"{name} not asked for, or without a weight, yet returned"
            continue
        dtype = x.dtype if name == "dx" or weight is None else weight.dtype
        assert g.dtype == dtype, f"{name} is {g.dtype}, expected {dtype}"
        if name == "dx":
            assert g.stride() == x.stride(), f"dx strides {g.stride()}, x's {x.stride()}"
        bound = max(2 * relative_error(mine, ref) if mine is not None else 0.0, TOLERANCE[g.dtype])
        error = relative_error(g, ref)
        assert error <= bound, f"{name}: relative error {error:.3g} > {bound:.3g}"


def run_backward(dy, x, mean, var, weight, training, needs, layout, kernel):
    poison_allocator()
    return cuda_backward.backward(dy, x, mean, var, weight, EPS, training, needs, plan(layout, kernel))


ALL = (True, True, True)


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[why for _, why in SHAPES])
def test_backward_matches_float64(shape, dtype, layout, training, affine, path):
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training, affine)
    kernel = kernel_for(x, layout, path)
    got = run_backward(dy, x, mean, var, weight, training, ALL, layout, kernel)
    check_grads(got, dy, x, mean, var, weight, bias, training, ALL)


NEEDS = [(dx, dw, db) for dx in (True, False) for dw in (True, False) for db in (True, False)]


def _needs_id(needs):
    return "+".join(name for name, asked in zip(("dx", "dw", "db"), needs) if asked) or "none"


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("needs", NEEDS, ids=_needs_id)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (4, 24, 7, 7), (8, 4, 64, 64)], ids=_id)
def test_only_asked_gradients(shape, dtype, layout, training, path, needs):
    """Every subset of (dx, dweight, dbias): the others None, the asked ones right (each subset launches its
    own combination of kernels: frozen dx alone skips the reduction; training without dx stashes nothing)."""
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training, affine=True)
    got = run_backward(dy, x, mean, var, weight, training, needs, layout, kernel_for(x, layout, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, needs)


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=_id)
@pytest.mark.parametrize("shape", [(2, 4, 13, 17), (4, 16, 14, 14), (2, 64, 8, 8)], ids=_id)
def test_parameters_in_the_input_dtype(shape, dtype, layout, training, path):
    """A module converted with .half(): weight (and frozen statistics) in x's dtype, dweight and dbias too;
    float64 input with float32 parameters and running statistics."""
    param_dtype = torch.float32 if dtype == torch.float64 else dtype
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training, affine=True, param_dtype=param_dtype)
    got = run_backward(dy, x, mean, var, weight, training, ALL, layout, kernel_for(x, layout, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, ALL)


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (4, 16, 14, 14), (8, 8, 64, 64)], ids=_id)
def test_misaligned_tensors(shape, dtype, layout, training, path):
    """dy and x one element off their 16-byte alignment (views into longer buffers): the kernels must take
    single elements there (dx, freshly allocated, stays aligned). The references see aligned copies of the same
    values: PyTorch's own kernels (2.11, H200) faulted on channels_last float32 views (misaligned address),
    where the CUDA backward, given the same views, passed."""
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training, affine=True)

    def shifted(t):
        flat = torch.empty(t.numel() + 1, device="cuda", dtype=dtype)[1:]
        return flat.as_strided(t.shape, t.stride()).copy_(t)

    dy_off, x_off = shifted(dy), shifted(x)
    assert x_off.data_ptr() % 16 and dy_off.data_ptr() % 16
    got = run_backward(dy_off, x_off, mean, var, weight, training, ALL, layout, kernel_for(x, layout, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, ALL)


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
def test_nchw_1x1_planes_as_channels_last(path, training):
    """Contiguous NCHW with 1x1 planes is channels_last's memory, and the interface sends it there (the group
    kernel then reads it); dy may come with either's strides."""
    shape = (6, 40, 1, 1)
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, "nchw", training, affine=True)
    dy = dy.contiguous(memory_format=torch.channels_last)
    got = run_backward(dy, x, mean, var, weight, training, ALL, "channels_last",
                       kernel_for(x, "channels_last", path))
    check_grads(got, dy, x, mean, var, weight, bias, training, ALL)


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dy_in_another_layout(layout, path):
    """dy laid out otherwise than x (autograd gives no promise) is brought to x's layout first."""
    shape = (4, 16, 10, 12)
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, layout, True, affine=True)
    other = torch.contiguous_format if layout == "channels_last" else torch.channels_last
    dy = dy.contiguous(memory_format=other)
    got = run_backward(dy, x, mean, var, weight, True, ALL, layout, kernel_for(x, layout, path))
    check_grads(got, dy, x, mean, var, weight, bias, True, ALL)


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 4, 64, 64), (2, 8, 16, 16)], ids=_id)
def test_a_large_mean(shape, layout, training, path):
    """x of mean 10^3 and spread 0.5, and dy correlated with it, so that dx's (x - mean) term is as large as its
    dy term: computed as x * b + k' (the mean folded into k'), the two would cancel to ~1e-4 in float32. Against
    the definition in float64 with the statistics given (float32 statistics of such x differ from float64's by
    more than the kernels' error)."""
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, layout, training, affine=True)
    x = (x - 3) * 0.25 + 1e3
    if training:
        mean, var = (s.float() for s in batch_stats_reference(x))
    else:
        mean = mean + 1e3
    xhat = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + EPS)
    dy = make_layout(dy + xhat, layout)
    dx, dweight, dbias = run_backward(dy, x, mean, var, weight, training, ALL, layout, kernel_for(x, layout, path))
    sums = formula_sums(dy, x, mean, var, weight)
    bound = TOLERANCE[torch.float32]
    assert relative_error(dbias, sums.sum_dy) <= bound
    assert relative_error(dweight, sums.sum_dy_xmu * sums.invstd) <= bound
    assert formula_dx_error(dx, dy, x, training, sums) <= bound


@gpu
@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", ["", "read_once"], ids=["three_kernels", "read_once"])
def test_empty_batch(kernel, layout, dtype, training):
    """As PyTorch: dx empty (with x's strides), dweight and dbias zeros (written by the kernels: the outputs
    are poisoned)."""
    shape = (0, 3, 5, 5)
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training=False, affine=True)
    kernel = ("group" if layout == "channels_last" else "channel") if kernel else ""
    dx, dweight, dbias = run_backward(dy, x, mean, var, weight, training, ALL, layout, kernel)
    assert dx.shape == x.shape and dx.stride() == x.stride() and dx.dtype == dtype
    for got in (dweight, dbias):
        assert got.dtype == weight.dtype and got.shape == (3,) and torch.equal(got, torch.zeros_like(got))


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_runs_on_the_current_stream(path):
    """The stream is held back by a sleep, then refills dy: a launch on any other stream reads the old dy."""
    shape = (8, 16, 32, 32) if path == "three_kernels" else (2, 16, 16, 16)
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, "nchw", True, affine=True)
    kernel = kernel_for(x, "nchw", path)
    fresh = torch.randn_like(dy)
    cuda_backward.backward(dy, x, mean, var, weight, EPS, True, ALL, plan("nchw", kernel))  # build before holding back
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        dy.copy_(fresh)
        got = cuda_backward.backward(dy, x, mean, var, weight, EPS, True, ALL, plan("nchw", kernel))
    stream.synchronize()
    check_grads(got, fresh, x, mean, var, weight, bias, True, ALL)


@gpu
@pytest.mark.skipif(HAS_GPU and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device():
    with torch.cuda.device(1):
        dy, x, mean, var, weight, bias = (t if t is None else t.to("cuda:1") for t in
                                          make_inputs((4, 8, 16, 16), torch.float32, "nchw", True, affine=True))
    with torch.cuda.device(0):
        got = cuda_backward.backward(dy, x, mean, var, weight, EPS, True, ALL, plan("nchw", ""))
    assert all(g.device == x.device for g in got)
    check_grads(got, dy, x, mean, var, weight, bias, True, ALL)


@gpu
def test_errors_name_the_problem():
    dy, x, mean, var, weight, _ = make_inputs((4, 8, 16, 16), torch.float32, "nchw", True, affine=True)
    cases = [
        ((dy, x, mean, var, weight, EPS, True, ALL, "channels_last", ""), "memory layout"),
        ((dy.half(), x, mean, var, weight, EPS, True, ALL, "nchw", ""), "output gradient"),
        ((dy, x, mean[:-1], var, weight, EPS, True, ALL, "nchw", ""), "one value per channel"),
        ((dy, x, mean, var, weight.double(), EPS, True, ALL, "nchw", ""), "float32 or the input's dtype"),
        ((dy, x, mean, var, weight, EPS, True, ALL, "nchw", "group"), "channels_last input"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            cuda_backward.backward(*args[:-2], plan(*args[-2:]))
    # A channel too large for a block's shared memory, forced onto the read-once kernel.
    big = make_inputs((16, 2, 128, 128), torch.float32, "nchw", True, affine=True)
    with pytest.raises(RuntimeError, match="shared memory"):
        cuda_backward.backward(*big[:5], EPS, True, ALL, plan("nchw", "channel"))


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if HAS_GPU else 0


class Sums(NamedTuple):
    sum_dy: torch.Tensor
    sum_dy_xmu: torch.Tensor
    count: int
    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor


def _slices(x, rows=256):
    """Slices of H: a float64 copy of the whole of a large tensor need not fit."""
    return [slice(h, h + rows) for h in range(0, x.size(2), rows)]


def formula_sums(dy, x, mean, var, weight) -> Sums:
    """The two sums of the definition in float64, with the statistics given (not x's own)."""
    mean64 = mean.double().view(1, -1, 1, 1)
    sum_dy = sum_dy_xmu = 0
    for s in _slices(x):
        g = dy[:, :, s].double()
        sum_dy = sum_dy + g.sum((0, 2, 3))
        sum_dy_xmu = sum_dy_xmu + (g * (x[:, :, s].double() - mean64)).sum((0, 2, 3))
    return Sums(sum_dy, sum_dy_xmu, x.numel() // x.size(1), mean.double(), torch.rsqrt(var.double() + EPS),
                weight.double())


def formula_dx_error(dx, dy, x, training, sums: Sums) -> float:
    """relative_error of dx against the definition in float64 with the statistics given, slice by slice."""
    def view(t):
        return t.view(1, -1, 1, 1)

    scale = view(sums.weight * sums.invstd)
    num = den = 0.0
    for s in _slices(x):
        g = dy[:, :, s].double()
        ref = g * scale
        if training:
            xmu = x[:, :, s].double() - view(sums.mean)
            projection = sums.invstd ** 2 * sums.sum_dy_xmu / sums.count
            ref = scale * (g - view(sums.sum_dy / sums.count) - xmu * view(projection))
        got = dx[:, :, s].double()
        if not torch.isfinite(got).all():
            return float("inf")
        num += (got - ref).norm().item() ** 2
        den += ref.norm().item() ** 2
    return (num / den) ** 0.5


@gpu
@pytest.mark.skipif(_free_bytes() < (40 << 30), reason="needs 40 GB of free GPU memory")
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("shape, fmt", [((1, 2, 32768, 32770), torch.contiguous_format),
                                        ((1, 2, 32769, 32769), torch.contiguous_format),
                                        ((1, 64, 8192, 4097), torch.channels_last)],
                         ids=["nchw", "nchw_odd_plane", "channels_last"])
def test_more_than_2_31_elements(shape, fmt, training):
    """float16 past 2^31 elements on the three-kernel path (64-bit offsets, pieces of over 2^31 elements):
    dx, dweight and dbias against float64 sums over slices."""
    layout = "channels_last" if fmt == torch.channels_last else "nchw"
    x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
    assert x.numel() > 2 ** 31
    dy = torch.randn_like(x)
    c = shape[1]
    weight = torch.randn(c, device="cuda")
    if training:  # float32 batch statistics, from float64 sums over slices
        count = x.numel() // c
        mean = sum(x[:, :, s].double().sum((0, 2, 3)) for s in _slices(x)) / count
        m2 = sum(((x[:, :, s].double() - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) for s in _slices(x))
        mean, var = mean.float(), (m2 / count).float()
    else:
        mean, var = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    dx, dweight, dbias = cuda_backward.backward(dy, x, mean, var, weight, EPS, training, ALL, plan(layout, ""))
    assert dx.stride() == x.stride()
    sums = formula_sums(dy, x, mean, var, weight)
    # Sums of 2^30 random signs: 1e-5 of them is ~100x float32's rounding of the sum's size.
    assert relative_error(dbias, sums.sum_dy) <= 1e-5
    assert relative_error(dweight, sums.sum_dy_xmu * sums.invstd) <= 1e-5
    assert formula_dx_error(dx, dy, x, training, sums) <= TOLERANCE[torch.float16]


def _rule(shape, layout="nchw", dtype=torch.float32):
    kernels = dispatch.cuda_backward(make_layout(torch.empty(shape, device="meta", dtype=dtype), layout)).kernels
    return {v: k for k, v in NAMES.items()}.get(kernels[0], "")


def test_backward_kernel_rule():
    """Read once where dy's and x's channel (NCHW) or GROUP_BYTES of every row of both (channels_last, at least
    GROUP_MIN_BLOCKS groups) fit in READ_ONCE_BYTES; else three kernels. Pinned at the thresholds."""
    assert (dispatch.BACKWARD_BLOCK_BYTES, dispatch.GROUP_BYTES, dispatch.GROUP_MIN_BLOCKS) == (112 << 10, 32, 64)
    # NCHW: 2 * N*H*W * element size <= 112 KB.
    half, double = torch.float16, torch.float64
    assert _rule((1, 64, 112, 128)) == _rule((2, 3, 56, 128)) == _rule((1, 1, 224, 128), dtype=half) == "channel"
    assert _rule((1, 64, 113, 128)) == _rule((1, 1, 225, 128), dtype=half) == ""
    assert _rule((1, 1, 56, 128), dtype=double) == "channel" and _rule((1, 1, 57, 128), dtype=double) == ""
    # channels_last: 2 * N*H*W * 32 <= 112 KB (1792 rows) and at least 64 groups of 32 bytes.
    assert _rule((1792, 512, 1, 1), "channels_last") == _rule((2, 1024, 7, 7), "channels_last", half) == "group"
    assert _rule((1793, 512, 1, 1), "channels_last") == ""
    assert _rule((2, 1016, 7, 7), "channels_last", half) == "group"  # 63.5 groups: the last one partial
    assert _rule((2, 1008, 7, 7), "channels_last", half) == _rule((2, 504, 7, 7), "channels_last") == ""
    assert _rule((2, 256, 7, 7), "channels_last", double) == "group"
