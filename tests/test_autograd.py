"""Training with autograd on the kernels: gradients against float64 and gradcheck, only this project's kernels
on the training path, torch.compile of a training step with its backward, and a CUDA graph of one. On a CPU
machine the Triton backend runs in its interpreter."""
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE, TOLERANCE, gpu, make_layout
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bn2d import BatchNorm2d, batch_norm, explain
from bn2d.reference import relative_error

KERNELS = [b for b in BACKENDS if b != "cuda_naive"]  # the naive kernel is eval only
# Triton's interpreter adds a tile's column in order (numpy), not as a tree: sums of a few hundred float32
# terms there lose up to a few ulps more than on a GPU.
INTERPRETER_SLACK = 4 if DEVICE == "cpu" else 1
LAYOUTS = ["nchw", "channels_last"]


def reference_grads(x, dy, weight, bias, running, training):
    """dx, dweight, dbias of F.batch_norm on float64 copies."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    mean, var = (None, None) if running is None else (t.double() for t in running)
    y = F.batch_norm(x64, mean, var, w64, b64, training)
    return torch.autograd.grad(y, (x64, w64, b64), dy.double())


def own_error(x, dy, weight, bias, running, training):
    """PyTorch's own relative errors (dx, dweight, dbias) in x's dtype against float64."""
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    mean, var = (None, None) if running is None else (t.clone() for t in running)
    grads = torch.autograd.grad(F.batch_norm(xs, mean, var, ws, bs, training), (xs, ws, bs), dy)
    return [relative_error(g, r) for g, r in zip(grads, reference_grads(x, dy, weight, bias, running, training))]


@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 6, 7, 7), (2, 16, 14, 14), (8, 3, 1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", KERNELS)
def test_gradients_within_twice_pytorchs_error(backend, shape, layout, dtype, training):
    """dx, dweight and dbias as a user asks for them (autograd.grad through batch_norm), each within 2x PyTorch's
    own relative error against float64 (or the dtype's tolerance, where PyTorch's is smaller)."""
    if DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("PyTorch's CPU batch_norm is no reference in 16-bit types")
    x = make_layout(torch.randn(shape, device=DEVICE) * 2 + 1, layout).to(dtype).requires_grad_()
    c = shape[1]
    weight = torch.randn(c, device=DEVICE).requires_grad_()
    bias = torch.randn(c, device=DEVICE).requires_grad_()
    running = None if training else (torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5)
    dy = torch.randn_like(x)
    mean, var = (None, None) if running is None else (t.clone() for t in running)
    grads = torch.autograd.grad(batch_norm(x, mean, var, weight, bias, training, backend=backend), (x, weight, bias), dy)
    expected = reference_grads(x, dy, weight, bias, running, training)
    mine = own_error(x, dy, weight, bias, running, training)
    for name, g, ref, own in zip(("dx", "dweight", "dbias"), grads, expected, mine):
        assert g.dtype == (x.dtype if name == "dx" else weight.dtype) and g.shape == ref.shape, name
        bound = max(2 * own, TOLERANCE[g.dtype] * INTERPRETER_SLACK)
        assert relative_error(g, ref) <= bound, name


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "frozen"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", KERNELS)
def test_gradcheck_float64(backend, layout, training, affine):
    x = make_layout(torch.randn(2, 3, 4, 5, device=DEVICE, dtype=torch.float64), layout).requires_grad_()
    params = [torch.randn(3, device=DEVICE, dtype=torch.float64).requires_grad_() for _ in range(2)] if affine else []
    running = None if training else (torch.randn(3, device=DEVICE, dtype=torch.float64),
                                     torch.rand(3, device=DEVICE, dtype=torch.float64) + 0.5)

    def f(x, *params):
        mean, var = (None, None) if running is None else running
        return batch_norm(x, mean, var, *params, training=training, backend=backend)

    assert torch.autograd.gradcheck(f, (x, *params))


class OpRecorder(TorchDispatchMode):
    """The ops the autograd engine and the interface dispatch (a registered op's own body unseen)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name.removeprefix("aten::"))
        return func(*args, **(kwargs or {}))


# What a training step may dispatch besides this project's kernels: allocation, and the module's
# num_batches_tracked += 1 (nn.BatchNorm2d's own bookkeeping).
ALLOWED = {"empty", "empty_like", "empty_strided", "new_empty", "add_"}


@gpu  # Triton's interpreter moves tensors through numpy with aten copies of its own
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", KERNELS)
def test_training_step_runs_only_this_projects_ops(backend, layout):
    """Forward and backward of a BatchNorm2d in training mode: allocations and this project's kernels, no aten
    reduction or elementwise op (the num_batches_tracked increment is the module's, as nn.BatchNorm2d's)."""
    bn = BatchNorm2d(6, backend=backend).to(DEVICE)
    x = make_layout(torch.randn(4, 6, 5, 5, device=DEVICE), layout).requires_grad_()
    dy = torch.randn_like(x)
    with OpRecorder() as recorder:
        y = bn(x)
        torch.autograd.grad(y, (x, bn.weight, bn.bias), dy)
    assert recorder.ops - ALLOWED == set()


# The backends whose kernels run on DEVICE (on a CPU machine, Triton's interpreter).
ON_DEVICE = KERNELS if DEVICE == "cuda" else ["triton"]


@pytest.mark.parametrize("backend", ON_DEVICE)
def test_double_backward_says_so(backend):
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    y = batch_norm(x, None, None, training=True, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)


@gpu
@pytest.mark.parametrize("params", ["affine", "weight", "bias", "plain"])
def test_cuda_eager_training_backward_is_a_cpp_node(params):
    """The CUDA backend's eager training forward records its backward as one C++ autograd node, whose
    gradients are asked for only where needed (an absent weight or bias is no input of it)."""
    x = torch.randn(4, 6, 5, 5, device="cuda", requires_grad=True)
    weight = torch.randn(6, device="cuda", requires_grad=True) if params in ("affine", "weight") else None
    bias = torch.randn(6, device="cuda", requires_grad=True) if params in ("affine", "bias") else None
    y = batch_norm(x, None, None, weight, bias, training=True)
    assert y.grad_fn.name() == "bn2d::BatchNormBackward"
    dy = torch.randn_like(y)
    inputs = [t for t in (x, weight, bias) if t is not None]
    # The reference on the CPU: PyTorch's CUDA backward refuses a bias without a weight.
    cpu = [t.detach().cpu().requires_grad_() for t in inputs]
    given = dict(zip([name for name, t in (("weight", weight), ("bias", bias)) if t is not None], cpu[1:]))
    reference = F.batch_norm(cpu[0], None, None, training=True, **given)
    for asked in ([len(inputs) - 1], range(len(inputs))):
        grads = torch.autograd.grad(y, [inputs[i] for i in asked], dy, retain_graph=True)
        references = torch.autograd.grad(reference, [cpu[i] for i in asked], dy.cpu(), retain_graph=True)
        for g, r in zip(grads, references):
            assert relative_error(g.cpu(), r) <= 10 * TOLERANCE[torch.float32]


@gpu
def test_cuda_eager_training_node_keeps_autograds_rules():
    """The C++ node saves x as autograd's own nodes do: an in-place change of x after the forward, or a second
    backward through a freed graph, raises autograd's error; with retain_graph the gradients accumulate."""
    x = torch.randn(4, 6, 5, 5, device="cuda", requires_grad=True)
    weight = torch.randn(6, device="cuda", requires_grad=True)
    y = batch_norm(x * 1, None, None, weight, None, training=True)
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = x.grad.clone(), weight.grad.clone()
    y.backward(dy)
    assert torch.allclose(x.grad, 2 * first[0]) and torch.allclose(weight.grad, 2 * first[1])
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(dy)
    inner = x * 1
    y = batch_norm(inner, None, None, weight, None, training=True)
    inner.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_module_counts_its_batches_in_the_kernels(layout):
    """Once its launch is kept (after the first call), the CUDA module's training forward increments
    num_batches_tracked in its kernels, as nn.BatchNorm2d's add_ does: the same count, and no aten op besides
    allocations. NCHW 4x6x5x5 takes a read-once kernel; 8x6x64x65, and channels_last, the statistics kernels."""
    for shape in ((4, 6, 5, 5), (8, 6, 64, 65)):
        bn, reference = BatchNorm2d(6).cuda(), nn.BatchNorm2d(6).cuda()
        x = make_layout(torch.randn(*shape, device="cuda"), layout).requires_grad_()
        for _ in range(4):
            bn(x)
            reference(x)
        assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked) == 4
        assert relative_error(bn.running_var, reference.running_var.double()) <= 1e-6
        with OpRecorder() as recorder:
            bn(x)
        assert recorder.ops <= {"empty", "empty_like", "empty_strided"} and int(bn.num_batches_tracked) == 5


def test_explain_for_a_training_call_with_grad():
    """With autograd the forward keeps its statistics for the backward: the read-once kernels do, and a
    tensor too large for them takes the statistics kernels, then the normalisation; the backward's plan comes
    last, for a frozen BatchNorm too."""
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    assert [p.kernels for p in explain(x, None, None, training=True, backend="triton")] == [
        ("channel_kernel",), ("backward_channel_kernel",)]
    x = torch.randn(4, 2, 64, 65, device=DEVICE, requires_grad=True)
    plans = explain(x, None, None, training=True, backend="triton")
    assert plans[0].kernels == ("stats_kernel", "finalize_kernel") and [p.op for p in plans[1:]] == ["eval", "backward"]
    running = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    assert [p.op for p in explain(x, *running, backend="triton")] == ["eval", "backward"]
    assert [p.op for p in explain(x.detach(), *running, backend="triton")] == ["eval"]


def _model(backend=None):
    bn = nn.BatchNorm2d(8) if backend is None else BatchNorm2d(8, backend=backend)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4))


@gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_training_step_fullgraph(backend):
    """A model with the module compiles in one graph in training mode, backward included, and its gradients and
    running statistics match eager PyTorch's."""
    torch.manual_seed(0)
    model, reference = _model(backend).cuda(), _model().cuda()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 3, 8, 8, device="cuda")
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(p.grad, q.grad.double()) <= 1e-4, name
    assert relative_error(model[1].running_var, reference[1].running_var.double()) <= 1e-6


@gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_cuda_graph_of_a_training_step(backend):
    """Forward, backward and an SGD step captured in one CUDA graph and replayed on fresh data match the same
    step run eagerly."""
    torch.manual_seed(0)
    model, reference = _model(backend).cuda(), _model().cuda()
    reference.load_state_dict(model.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    static_x = torch.randn(16, 3, 8, 8, device="cuda")

    def step():
        optimizers[0].zero_grad(set_to_none=False)
        model(static_x).square().sum().backward()
        optimizers[0].step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture: build, JIT, allocator, optimizer state
            step()
            optimizers[1].zero_grad(set_to_none=False)
            reference(static_x).square().sum().backward()
            optimizers[1].step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    optimizers[1].zero_grad(set_to_none=False)
    reference(fresh).square().sum().backward()
    optimizers[1].step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert relative_error(p, q.double()) <= 1e-5
