"""The Triton backward (bn2d.triton_backward) against float64 autograd of F.batch_norm: dx, dweight and dbias,
training and frozen, every dtype and layout, both kernel paths, only the gradients asked for.

Each gradient's relative L2 error must be within 2x PyTorch's own (F.batch_norm's backward in the input's dtype,
on the same inputs) or within TOLERANCE of the gradient's dtype, whichever is larger: PyTorch's own error is
~0 where the gradient is stored in a wider type than it was computed from. Outputs are allocated NaN-filled
(`poisoned`), so an element a kernel should write and does not fails."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOLERANCE, make_layout, make_params

from bn2d import dispatch, triton_backward
from bn2d.reference import batch_stats_reference, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = 1e-5
# 1x1 planes; 7x7 with more channels than a group (channels_last), a partial one; odd planes.
SHAPES = [(3, 5, 1, 1), (2, 12, 7, 7), (2, 4, 13, 17)]
LAYOUTS = ["nchw", "channels_last"]


class _PoisonedTorch:
    """torch, with empty and empty_like returning NaN-filled tensors (outputs and intermediates alike)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(triton_backward, "torch", _PoisonedTorch())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The references are tiny CPU ops: on a busy machine, waiting on a second thread costs them 40x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _plan(x, path):
    """The plan for a test path: three kernels, or the read-once kernel the rule picks."""
    return dispatch.triton_backward(x, fused=path == "read_once")


def _reads_once(shape, layout):
    return len(dispatch.triton_backward(make_layout(torch.empty(shape, device="meta"), layout)).kernels) == 1


def _cases(shapes, layouts=LAYOUTS):
    """(shape, layout, path) for both paths, the read-once one where it applies."""
    return [(s, layout, path) for s in shapes for layout in layouts for path in ["three_kernels", "read_once"]
            if path == "three_kernels" or _reads_once(s, layout)]


def _id(value):
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


def make_inputs(shape, dtype, layout, training, affine, param_dtype=torch.float32):
    """dy, x (random, laid out as `layout`), the statistics the forward would have used (the batch's, or
    random running ones), weight (None unless affine) and a bias for the references."""
    x = make_layout((torch.randn(shape, device=DEVICE) * 2 + 3).to(dtype), layout)
    dy = make_layout(torch.randn(shape, device=DEVICE).to(dtype), layout)
    mean, var, weight, bias = make_params(shape[1], param_dtype, affine=True)
    if training:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        mean, var = (s.to(acc) for s in batch_stats_reference(x))
    if dtype == torch.float64:
        weight, bias = weight.double(), bias.double()
    return dy, x, mean, var, weight if affine else None, bias if affine else bias.to(dtype)


def reference_grads(dy, x, mean, var, weight, bias, training, dtype=torch.float64):
    """(dx, dweight, dbias) by autograd of F.batch_norm on the CPU, in `dtype` (float64: the reference) with the
    given statistics (training: x's own), returned on x's device. In another dtype, PyTorch's own; bias is then
    dropped without a weight (its CPU kernel refuses a 16-bit bias beside float32 statistics), so dbias is None.
    On the CPU because PyTorch's CUDA backward refuses a bias without a weight ("returned an invalid gradient at
    index 2")."""
    if dtype != torch.float64 and weight is None:
        bias = None
    grads = _reference_grads_cpu(*(t if t is None else t.cpu() for t in (dy, x, mean, var, weight, bias)), training,
                                 dtype)
    return [g if g is None else g.to(x.device) for g in grads]


def _reference_grads_cpu(dy, x, mean, var, weight, bias, training, dtype):
    cast = (lambda t: t.double()) if dtype == torch.float64 else (lambda t: t)
    x = cast(x).detach().requires_grad_()
    params = [None if p is None else cast(p).detach().requires_grad_() for p in (weight, bias)]
    stats = (None, None) if training else (cast(mean), cast(var))
    y = F.batch_norm(x, *stats, *params, training, 0.0, EPS)
    inputs = [t for t in (x, *params) if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, cast(dy)))
    return [next(grads) if t is not None else None for t in (x, *params)]


def check_grads(got, dy, x, mean, var, weight, bias, training, needs):
    """Each gradient asked for within max(2x PyTorch's own error, TOLERANCE of its dtype) of float64; the others
    None; dx with x's strides, dweight in weight's dtype, dbias in weight's (x's without a weight)."""
    expected = reference_grads(dy, x, mean, var, weight, bias, training)
    own = reference_grads(dy, x, mean, var, weight, bias, training, x.dtype)
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


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape, layout, path", _cases(SHAPES), ids=_id)
def test_backward_matches_float64(shape, layout, path, dtype, training, affine):
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training, affine)
    got = triton_backward.backward(dy, x, mean, var, weight, EPS, training, (True, True, True), _plan(x, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, (True, True, True))


NEEDS = [(dx, dw, db) for dx in (True, False) for dw in (True, False) for db in (True, False)]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "+".join(g for g, a in zip(("dx", "dw", "db"), n) if a) or "none")
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("shape, layout, path", _cases([(2, 5, 6, 7)]), ids=_id)
def test_only_asked_gradients(shape, layout, path, training, needs):
    """Every subset of (dx, dweight, dbias): the others None, the asked ones right (each subset launches
    its own combination of kernels and flags)."""
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, layout, training, affine=True)
    got = triton_backward.backward(dy, x, mean, var, weight, EPS, training, needs, _plan(x, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, needs)


@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("shape, layout, path", _cases([(2, 4, 13, 17)]), ids=_id)
def test_parameters_in_the_input_dtype(shape, layout, path, dtype, training):
    """A module converted with .half(): weight (and frozen statistics) in x's dtype, dweight and dbias too."""
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training, affine=True, param_dtype=dtype)
    got = triton_backward.backward(dy, x, mean, var, weight, EPS, training, (True, True, True), _plan(x, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, (True, True, True))


@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("path", ["three_kernels", "read_once"])
def test_nchw_1x1_planes_as_channels_last(path, training):
    """Contiguous NCHW with 1x1 planes is channels_last's memory, and the interface sends it there."""
    shape = (6, 5, 1, 1)
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, "nchw", training, affine=True)
    got = triton_backward.backward(dy, x, mean, var, weight, EPS, training, (True, True, True), _plan(x, path))
    check_grads(got, dy, x, mean, var, weight, bias, training, (True, True, True))


@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduction_over_many_parts(monkeypatch, layout, training):
    """Tiny tiles: NCHW in several parts (blocks of planes) and several steps along each plane; channels_last
    in several chunks of rows, several steps each, and several channel blocks, one partial; the finalize in
    several steps over the parts, and programs of channels, one partial."""
    monkeypatch.setattr(triton_backward, "REDUCE_TILE_ELEMENTS", 32)  # NCHW: 1 plane of 45 in 2 steps of 32
    monkeypatch.setattr(triton_backward, "REDUCE_CHANNELS", 8)  # channels_last: 8 + 8 + 4 channels, 4 rows a step
    monkeypatch.setattr(triton_backward, "REDUCE_ROW_CHUNKS", 5)  # channels_last: 5 chunks of 27 rows
    monkeypatch.setattr(triton_backward, "FINALIZE_PARTS", 2)
    monkeypatch.setattr(triton_backward, "DX_BLOCK", 128)
    shape = (3, 20, 5, 9)
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, layout, training, affine=True)
    got = triton_backward.backward(dy, x, mean, var, weight, EPS, training, (True, True, True), _plan(x, ""))
    check_grads(got, dy, x, mean, var, weight, bias, training, (True, True, True))


@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout, dtype, training):
    """As PyTorch: dx empty (with x's strides), dweight and dbias zeros."""
    shape = (0, 3, 5, 5)
    dy, x, mean, var, weight, bias = make_inputs(shape, dtype, layout, training=False, affine=True)
    dx, dweight, dbias = triton_backward.backward(dy, x, mean, var, weight, EPS, training, (True, True, True),
                                                  _plan(x, ""))
    expected = reference_grads(dy, x, mean, var, weight, bias, training, dtype)
    assert dx.shape == x.shape and dx.stride() == x.stride() and dx.dtype == dtype
    for got, ref in zip((dweight, dbias), expected[1:]):
        assert got.dtype == ref.dtype and torch.equal(got, ref) and not got.any()


def test_an_unwritten_element_fails():
    """The checks see NaN: one element of dx left as the poisoned allocation has it fails check_grads."""
    shape = (2, 3, 7, 7)
    dy, x, mean, var, weight, bias = make_inputs(shape, torch.float32, "nchw", True, affine=True)
    dx, dweight, dbias = triton_backward.backward(dy, x, mean, var, weight, EPS, True, (True, True, True), _plan(x, ""))
    check_grads((dx, dweight, dbias), dy, x, mean, var, weight, bias, True, (True, True, True))
    dx.view(-1)[17] = float("nan")
    with pytest.raises(AssertionError, match="dx"):
        check_grads((dx, dweight, dbias), dy, x, mean, var, weight, bias, True, (True, True, True))
    assert math.isinf(relative_error(dx, dx.double()))


def test_backward_rule():
    """Read once where a channel (NCHW: N planes, each side rounded up to a power of two) or a group of up to
    GROUP_CHANNELS channels (channels_last: every row) fits in CHANNEL_TILE_ELEMENTS; else three kernels.
    Pinned at the thresholds."""
    def rule(shape, layout="nchw"):
        kernels = dispatch.triton_backward(make_layout(torch.empty(shape, device="meta"), layout)).kernels
        return {"backward_channel_kernel": "channel", "backward_channel_group_kernel": "group"}.get(kernels[0], "")

    assert (dispatch.CHANNEL_TILE_ELEMENTS, dispatch.GROUP_CHANNELS) == (16384, 8)
    assert rule((32, 64, 16, 32)) == rule((17, 3, 21, 24)) == rule((1, 1, 128, 128)) == "channel"
    assert rule((32, 64, 16, 33)) == rule((33, 64, 16, 32)) == rule((1, 1, 129, 128)) == ""
    assert rule((2, 64, 32, 32), "channels_last") == rule((2, 5, 32, 32), "channels_last") == "group"
    assert rule((2, 64, 32, 33), "channels_last") == ""
    assert rule((2, 4, 64, 32), "channels_last") == "group" and rule((2, 5, 64, 32), "channels_last") == ""
    assert rule((2048, 8, 1, 1), "channels_last") == "group" and rule((2049, 8, 1, 1), "channels_last") == ""
