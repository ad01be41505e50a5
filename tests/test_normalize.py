"""The kernels against the float64 reference: every backend, dtype, layout and shape, outputs poisoned."""
import pytest
import torch
from conftest import BACKENDS, DEVICE, SHAPES, TOLERANCE, make_layout, make_params

from bn2d import TritonConfig, batch_norm, dispatch, explain, output_like
from bn2d.reference import batch_norm_reference, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last", "strided"]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# (backend, layout) pairs: cuda_naive reads contiguous NCHW only.
BACKEND_LAYOUTS = [(b, layout) for b in BACKENDS for layout in LAYOUTS if b != "cuda_naive" or layout == "nchw"]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("param_dtype", ["fp32", "same"], ids=["params_fp32", "params_same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
def test_matches_reference(backend, layout, shape, dtype, param_dtype, affine):
    x = make_layout(torch.randn(shape, device=DEVICE).to(dtype), layout)
    mean, var, weight, bias = make_params(shape[1], torch.float32 if param_dtype == "fp32" else dtype, affine=affine)
    out = output_like(x, backend).fill_(float("nan"))  # an element the kernel leaves unwritten fails
    y = batch_norm(x, mean, var, weight, bias, eps=1e-3, backend=backend, out=out)
    assert y is out
    ref = batch_norm_reference(x, mean, var, weight, bias, eps=1e-3)
    assert relative_error(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend, layout", BACKEND_LAYOUTS)
def test_output_keeps_dtype_and_memory_format(backend, layout, dtype):
    x = make_layout(torch.randn(2, 8, 6, 6, device=DEVICE).to(dtype), layout)
    params = make_params(8)
    y = batch_norm(x, *params, backend=backend)
    expected = torch.nn.functional.batch_norm(x.cpu(), *(t.cpu().to(dtype) for t in params))  # PyTorch's choice
    assert y.dtype == dtype and y.shape == x.shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and expected.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place(backend):
    x = torch.randn(2, 8, 9, 9, device=DEVICE)
    params = make_params(8)
    ref = batch_norm_reference(x, *params)
    y = batch_norm(x, *params, backend=backend, out=x)
    assert y is x and relative_error(x, ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("block", [(1, 16, 1), (4, 8, 2), (32, 1, 1)], ids=lambda b: "r{}_l{}_w{}".format(*b))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_configs(layout, block):
    """Small tiles: many programs per plane and many planes per program."""
    x = make_layout(torch.randn(2, 6, 5, 7, device=DEVICE), layout)
    params = make_params(6)
    y = batch_norm(x, *params, backend="triton", config=dict(zip(("block_r", "block_l", "num_warps"), block)))
    assert relative_error(y, batch_norm_reference(x, *params)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("shape", [(2, 32, 96, 96), (4, 16, 99, 99)], ids=["96x96", "99x99"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_large_16bit(layout, shape):
    """Past FLAT_ELEMENTS, 16-bit tensors take the tile kernel, and NCHW planes that are not a whole number of
    16 elements the flat kernel with 16-byte vectors of eight."""
    x = make_layout(torch.randn(shape, device=DEVICE).half(), layout)
    assert x.numel() > dispatch.FLAT_ELEMENTS
    params = make_params(shape[1])
    flat = layout == "nchw" and shape[2] == 99
    assert explain(x, *params, backend="triton")[0].kernels == (
        ("normalize_flat_kernel",) if flat else ("normalize_kernel",))
    out = output_like(x, "triton").fill_(float("nan"))
    batch_norm(x, *params, backend="triton", out=out)
    assert relative_error(out, batch_norm_reference(x, *params)) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("block", [None, (1, 8192, 4)], ids=["default", "r1_l8192_w4"])
def test_triton_flat_planes(block, dtype):
    """Past FLAT_ELEMENTS, the flat kernel's programs compute scale and shift per plane (where Triton has
    tl.gather): 7x7 planes, a channel count that is not a power of two, and a last program cut short."""
    x = torch.randn(12, 1000, 7, 7, device=DEVICE, dtype=dtype)
    assert x.numel() > dispatch.FLAT_ELEMENTS and x.numel() % 8192
    assert dispatch.triton_eval(x, TritonConfig(1, 8192, 4)).launch["PLANES"] == (256 if dispatch.HAS_GATHER else 0)
    params = make_params(1000)
    config = None if block is None else dict(zip(("block_r", "block_l", "num_warps"), block))
    out = output_like(x, "triton").fill_(float("nan"))
    batch_norm(x, *params, backend="triton", config=config, out=out)
    assert relative_error(out, batch_norm_reference(x, *params)) <= TOLERANCE[dtype]


def test_bad_config():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(TypeError, match="TritonConfig"):
        batch_norm(x, *make_params(3), backend="triton", config=(1, 2, 3))
    with pytest.raises(ValueError, match="strides"):
        batch_norm(x, *make_params(3), backend="triton", out=torch.empty(2, 3, 4, 8, device=DEVICE)[..., ::2])
