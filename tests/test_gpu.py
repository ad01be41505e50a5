"""What needs a GPU: tensors past 2^31 elements, streams and devices, gradcheck, torch.compile, CUDA graphs."""
import pytest
import torch
from conftest import TOLERANCE, gpu, make_params
from torch import nn

from bn2d import BatchNorm2d, CudaConfig, batch_norm, cuda_module, dispatch, output_like
from bn2d.reference import batch_norm_error, batch_norm_reference, relative_error

pytestmark = gpu
KERNELS = ["cuda", "triton"]


@pytest.mark.parametrize("shape, fmt", [((1, 2, 32768, 32770), torch.contiguous_format),
                                        ((1, 2, 32769, 32769), torch.contiguous_format),
                                        ((1, 64, 8192, 4097), torch.channels_last)],
                         ids=["nchw", "nchw_odd_plane", "channels_last"])
@pytest.mark.parametrize("backend", KERNELS)
def test_more_than_2_31_elements(backend, shape, fmt):
    x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
    assert x.numel() > 2 ** 31
    params = make_params(shape[1])
    out = output_like(x).fill_(float("nan"))
    batch_norm(x, *params, backend=backend, out=out)
    assert batch_norm_error(out, x, *params) <= TOLERANCE[torch.float16]
    if fmt == torch.contiguous_format:
        with pytest.raises(RuntimeError, match="32 bits"):
            batch_norm(x, *params, backend="cuda_naive", out=out)


# Shapes for the launch configs (small=0: the tiled kernels, which these sizes would not take by default;
# small=1: the small-tensor kernels): 2-element planes (the largest shared-memory table; planes shorter than a
# vector), 7x7 planes (vectors straddle planes), planes longer than the largest tile (a tile spans two planes),
# a tail that is not a whole vector, and enough elements for a small grid to loop over several tiles.
CONFIG_SHAPES = [(3, 40, 1, 2), (4, 24, 7, 7), (2, 3, 130, 300), (3, 5, 7, 9), (16, 64, 28, 28)]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", [CudaConfig(32, True, 0, small=0), CudaConfig(256, True, 1),
                                    CudaConfig(1024, True, 0, small=0), CudaConfig(1024, True, 1),
                                    CudaConfig(128, False, 0, small=0), CudaConfig(32, True, 0, small=1),
                                    CudaConfig(256, True, 0, small=1), CudaConfig(128, False, 0, small=1)], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", CONFIG_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_configs(shape, fmt, config, dtype, offset):
    """Every launch config on every path of the CUDA kernels; `offset` shifts x and y off 16-byte alignment."""
    def buffer(like):
        flat = torch.empty(like.numel() + offset, device="cuda", dtype=dtype)[offset:]
        return flat.as_strided(like.shape, like.stride())

    dense = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
    x = buffer(dense).copy_(dense)
    out = buffer(dense).fill_(float("nan"))
    params = make_params(shape[1])
    batch_norm(x, *params, backend="cuda", config=config, out=out)
    assert relative_error(out, batch_norm_reference(x, *params)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", KERNELS)
def test_misaligned_parameters(backend, fmt, dtype):
    """Per-channel tensors one element off their vector alignment (views into longer vectors): a kernel that
    loads them as vectors must leave them to one that does not."""
    x = torch.randn(4, 64, 7, 8, device="cuda").to(dtype).contiguous(memory_format=fmt)
    params = [torch.cat([t.new_ones(1), t])[1:] for t in make_params(64, dtype)]
    out = output_like(x).fill_(float("nan"))
    batch_norm(x, *params, backend=backend, out=out)
    assert relative_error(out, batch_norm_reference(x, *params)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 3, 7, 7), (2, 4, 13, 17), (1, 32, 56, 56)],
                         ids=lambda s: "x".join(map(str, s)))
def test_eval_hot_path(shape, fmt, dtype, affine):
    """batch_norm's eval hot path (one bound call that allocates the output) is taken and right. Its output
    is poisoned through the allocator: a freed block of NaNs of the same size is what it hands out next."""
    x = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
    params = make_params(shape[1], affine=affine)
    code = dispatch.cuda_eval(x, *params[2:], *params[:2]).code
    torch.empty_like(x).fill_(float("nan"))
    y = cuda_module.eval_forward(x, *params[2:], *params[:2], 1e-3, code)
    assert y is not None and y.stride() == x.stride()
    assert relative_error(y, batch_norm_reference(x, *params, eps=1e-3)) <= TOLERANCE[dtype]


def test_eval_hot_path_declines():
    """Whatever the hot path does not take (None) goes down the general path, which handles it or raises."""
    x = torch.randn(2, 8, 6, 6, device="cuda")
    mean, var, weight, bias = make_params(8)
    wide = torch.randn(2, 8, 6, 12, device="cuda")[..., ::2]
    declined = [(wide, weight, bias, mean, var), (x[:0], weight, bias, mean, var),
                (x.clone().requires_grad_(), weight, bias, mean, var), (x, weight, bias, None, None),
                (x, weight[:-1], bias, mean, var), (x, weight.double(), bias, mean, var)]
    code = dispatch.cuda_eval(x, weight, bias, mean, var).code
    for args in declined:
        assert cuda_module.eval_forward(*args, 1e-5, code) is None
    with torch.no_grad():
        assert cuda_module.eval_forward(x.clone().requires_grad_(), weight, bias, mean, var, 1e-5, code) is not None
    misaligned = torch.randn(x.numel() + 1, device="cuda")[1:].view(x.shape)  # the plan's 16-byte vectors: no
    assert cuda_module.eval_forward(misaligned, weight, bias, mean, var, 1e-5, code) is None
    y = batch_norm(misaligned, mean, var, weight, bias)
    assert relative_error(y, batch_norm_reference(misaligned, mean, var, weight, bias)) <= TOLERANCE[torch.float32]
    y = batch_norm(wide, mean, var, weight, bias)
    assert relative_error(y, batch_norm_reference(wide, mean, var, weight, bias)) <= TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="weight should have 8 elements"):
        batch_norm(x, mean, var, weight[:-1], bias)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        batch_norm(x, mean, var, weight.double(), bias)


@pytest.mark.parametrize("backend", KERNELS)
def test_runs_on_the_current_stream(backend):
    """The stream is held back by a sleep, then refills x: a launch on any other stream reads the old x."""
    x = torch.randn(8, 16, 32, 32, device="cuda")
    fresh = torch.randn_like(x)
    params = make_params(16)
    batch_norm(x, *params, backend=backend)  # build and JIT before the stream is held back
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        x.copy_(fresh)
        y = batch_norm(x, *params, backend=backend)
    stream.synchronize()
    assert relative_error(y, batch_norm_reference(fresh, *params)) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", KERNELS)
def test_runs_on_the_inputs_device(backend):
    x = torch.randn(4, 8, 16, 16, device="cuda:1")
    params = make_params(8, device="cuda:1")
    with torch.cuda.device(0):
        y = batch_norm(x, *params, backend=backend)
    assert y.device == x.device
    assert relative_error(y, batch_norm_reference(x, *params)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", KERNELS)
def test_gradcheck_float64(backend, training):
    x = torch.randn(2, 3, 4, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    mean, var, weight, bias = (t.requires_grad_() for t in make_params(3, torch.float64))
    if training:
        f = lambda x, w, b: batch_norm(x, None, None, w, b, training=True, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, weight, bias))
    else:
        f = lambda x, m, v, w, b: batch_norm(x, m, v, w, b, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, mean, var, weight, bias))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend, training):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNorm2d(8, backend=backend), nn.ReLU()).cuda()
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).cuda()
    reference.load_state_dict(model.state_dict())
    model.train(training)
    reference.train(training)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    expected = reference(x)
    assert torch.allclose(compiled(x), expected, atol=1e-4)
    assert torch.allclose(model[1].running_mean, reference[1].running_mean, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_cuda_graph_capture_and_replay(backend):
    bn = BatchNorm2d(16, backend=backend).cuda().eval()
    bn.running_mean.normal_()
    static_x = torch.randn(4, 16, 14, 14, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        bn(static_x)  # warm-up: build, JIT and allocator outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = bn(static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    static_y.fill_(float("nan"))
    graph.replay()
    expected = batch_norm_reference(fresh, bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach())
    assert relative_error(static_y, expected) <= TOLERANCE[torch.float32]
