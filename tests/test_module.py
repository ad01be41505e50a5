"""BatchNorm2d and convert against nn.BatchNorm2d: state, train/eval, running statistics, gradients, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICE, TOLERANCE
from torch import nn

from bn2d import BatchNorm2d, BatchNormAddReLU2d, BatchNormReLU2d, batch_norm, convert, explain, kernelbench
from bn2d.reference import relative_error


def pair(backend, **kwargs):
    """An nn.BatchNorm2d with random state and our module holding the same state."""
    ref = nn.BatchNorm2d(6, **kwargs).to(DEVICE)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            if t is not None:
                t.copy_(torch.randn_like(t))
        if ref.running_var is not None:
            ref.running_var.copy_(torch.rand_like(ref.running_var) + 0.5)
    ours = BatchNorm2d(6, **kwargs, backend=backend).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_same_state(ref, ours):
    for (name, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert a.dtype == b.dtype, name
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no_track"])
def test_train_eval_steps_match_pytorch(backend, momentum, affine, track):
    ref, ours = pair(backend, momentum=momentum, affine=affine, track_running_stats=track)
    for training in (True, True, False, True, False):
        ref.train(training)
        ours.train(training)
        x = torch.randn(4, 6, 5, 7, device=DEVICE) * 3 + 1
        expected = ref(x)
        assert relative_error(ours(x), expected.double()) <= 1e-6
        assert_same_state(ref, ours)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradients_match_pytorch(backend, training):
    ref, ours = pair(backend)
    ref.train(training)
    ours.train(training)
    x = torch.randn(3, 6, 4, 5, device=DEVICE)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    ref(xr).backward(grad)
    ours(xo).backward(grad)
    for a, b in ((xr.grad, xo.grad), (ref.weight.grad, ours.weight.grad), (ref.bias.grad, ours.bias.grad)):
        assert relative_error(b, a.double()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_module_and_mixed_precision(backend):
    x = torch.randn(2, 6, 7, 7, device=DEVICE).half()
    for params_dtype in (torch.float16, torch.float32):
        ref, ours = pair(backend)
        ref.eval().to(params_dtype)
        ours.eval().to(params_dtype)
        expected = nn.functional.batch_norm(x.float(), ref.running_mean.float(), ref.running_var.float(),
                                            ref.weight.float(), ref.bias.float())
        y = ours(x)
        assert y.dtype == torch.float16
        assert relative_error(y, expected.double()) <= TOLERANCE[torch.float16]


def test_state_dict_loads_both_ways():
    ref = nn.BatchNorm2d(5)
    ref.running_mean.normal_()
    ref.num_batches_tracked += 7
    ours = BatchNorm2d(5, backend="triton")
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert_same_state(ref, back)
    assert "backend='triton'" in repr(ours)


def test_convert_swaps_every_batchnorm_and_shares_state():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, affine=False))).to(DEVICE).eval()
    bn_weight = model[1].weight
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    assert convert(model, "triton") is model
    assert type(model[1]) is BatchNorm2d and type(model[3][1]) is BatchNorm2d
    assert model[1].weight is bn_weight and model[3][1].backend == "triton" and not model[1].training
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    single = convert(nn.BatchNorm2d(3), "cuda")
    assert type(single) is BatchNorm2d and single.backend == "cuda"
    assert convert(single, "triton") is single and single.backend == "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_parametrized_and_functional_call_tensors_are_used(backend, training):
    """forward reads parameters and buffers from their dicts (the fast path) or, where a parametrization made
    one a property, as attributes; torch.func.functional_call swaps the dicts' entries."""
    ref, ours = pair(backend)
    x = torch.randn(4, 6, 5, 7, device=DEVICE)
    for m in (ref, ours):
        m.train(training)
        nn.utils.parametrize.register_parametrization(m, "weight", Double())
    assert relative_error(ours(x), ref(x).double()) <= 1e-6
    assert_same_state(ref, ours)
    swapped = {"bias": torch.randn(6, device=DEVICE), "running_var": torch.rand(6, device=DEVICE) + 0.5}
    mine = {name: t.clone() for name, t in swapped.items()}
    expected = torch.func.functional_call(ref, swapped, (x,))
    assert relative_error(torch.func.functional_call(ours, mine, (x,)), expected.double()) <= 1e-6
    assert torch.allclose(mine["running_var"], swapped["running_var"])


class Double(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_forward_traces_in_one_graph():
    bn = BatchNorm2d(6, backend="torch").eval()
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(torch.compile(bn, backend="eager", fullgraph=True)(x), bn(x))


def test_cpu_tensors_take_pytorch_path_for_cuda_backend():
    x = torch.randn(2, 3, 4, 4)
    stats = torch.randn(3), torch.rand(3) + 0.5
    assert torch.equal(batch_norm(x, *stats, backend="cuda"), nn.functional.batch_norm(x, *stats))


def test_empty_batch():
    bn = BatchNorm2d(3, backend="triton").to(DEVICE).eval()
    assert bn(torch.randn(0, 3, 4, 4, device=DEVICE)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("call, error, message", [
    (lambda: BatchNorm2d(3)(torch.randn(3, 4, 4)), ValueError, r"expected 4D input \(got 3D input\)"),
    (lambda: batch_norm(torch.randn(2, 4, 3, 3), torch.zeros(3), torch.ones(3)), ValueError,
     "running_mean should have 4 elements"),
    (lambda: batch_norm(torch.randn(2, 3, 3, 3).int(), torch.zeros(3), torch.ones(3)), TypeError,
     "unsupported input dtype torch.int32"),
    (lambda: batch_norm(torch.randn(2, 3, 3, 3), torch.zeros(3, device="meta"), torch.ones(3)), ValueError,
     "running_mean is on meta but the input is on cpu"),
    (lambda: batch_norm(torch.randn(2, 3, 3, 3).half(), torch.zeros(3).double(), torch.ones(3).double()),
     TypeError, "expected float32 or the input's dtype"),
    (lambda: batch_norm(torch.randn(2, 3, 3, 3).half(), torch.zeros(3), torch.ones(3).half()), TypeError,
     "share one dtype"),
    (lambda: batch_norm(torch.randn(2, 3, 3, 3), None, None), ValueError, "required in eval mode"),
    (lambda: batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True, backend="triton"), ValueError,
     "Expected more than 1 value per channel when training"),
    (lambda: batch_norm(torch.randn(2, 3, 3, 3), torch.zeros(3), torch.ones(3), backend="cudnn"), ValueError,
     "unknown backend 'cudnn'"),
    (lambda: BatchNorm2d(3, backend="cudnn"), ValueError, "unknown backend"),
], ids=["3d", "channels", "int", "device", "param_dtype", "mixed_pair", "eval_no_stats", "one_value",
        "backend", "module_backend"])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_kernelbench_interface():
    assert kernelbench.get_init_inputs() == [64]
    (x,) = kernelbench.get_inputs()
    assert x.shape == (64, 64, 512, 512) and x.min() >= 0
    ref, new = kernelbench.Model(64), kernelbench.ModelNew(64, backend="triton")
    new.load_state_dict(ref.state_dict())
    small = torch.rand(2, 64, 3, 3, device=DEVICE)
    assert torch.allclose(ref.to(DEVICE)(small), new.to(DEVICE)(small), atol=1e-5)


def test_triton_interpret_set_after_import(monkeypatch):
    """The Triton kernels were defined as the interpreter's or a GPU's at import: setting TRITON_INTERPRET later
    says so, instead of Triton's '0 active drivers'."""
    from bn2d import functional

    monkeypatch.setattr(functional, "_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after bn2d was imported"):
        batch_norm(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), backend="triton")


# The fused modules and convert(fuse=True). The kernels do not fuse the add and the ReLU yet (explain says so):
# what is checked here is the ops' meaning, which the fused kernels will keep.
FUSED_BACKENDS = ["torch", *BACKENDS]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
def test_fused_ops_match_the_unfused_ones(backend, training, residual):
    """relu(batch_norm(x) + z) as one call: its output, the running statistics and every gradient (x, weight,
    bias, z) as PyTorch's ops give them in float64."""
    x = torch.randn(4, 6, 5, 7, device=DEVICE, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True) if residual else None
    weight, bias = (torch.randn(6, device=DEVICE, requires_grad=True) for _ in range(2))
    running = torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5
    expected_running = tuple(t.double() for t in running)
    y = batch_norm(x, *running, weight, bias, training, backend=backend, activation="relu", residual=z)
    inputs = [t for t in (x, weight, bias, z) if t is not None]
    doubles = [t.detach().double().requires_grad_() for t in inputs]
    expected = F.batch_norm(doubles[0], *expected_running, doubles[1], doubles[2], training)
    expected = torch.relu(expected + doubles[3] if residual else expected)
    assert relative_error(y, expected) <= 1e-6
    assert all(relative_error(a, b) <= 1e-6 for a, b in zip(running, expected_running))
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(expected, doubles, dy.double())):
        assert relative_error(g, r) <= 1e-5


def test_fused_ops_check_their_arguments():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    running = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        batch_norm(x, *running, activation="gelu")
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        batch_norm(x, *running, activation="relu", residual=x[:1])
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        batch_norm(x, *running, residual=1.0)
    plans = explain(x, *running, backend="torch", activation="relu", residual=x)
    assert [(p.op, p.kernels) for p in plans] == [("eval", ("F.batch_norm",)), ("epilogue", ("add", "relu"))]


class Block(nn.Module):
    """A ResNet bottleneck's shape: one ReLU module used three times, the residual added in place, and a
    downsample BatchNorm computed after the block's last one."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.relu(out)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_convert_fuse_rewrites_the_graph_and_shares_state(training):
    model = nn.Sequential(Block(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()).to(DEVICE).train(training)
    reference = copy.deepcopy(model)
    fused = convert(model, "triton", fuse=True)
    kinds = {name: type(m) for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {"0.bn1": BatchNormReLU2d, "0.bn2": BatchNormAddReLU2d, "0.downsample.1": BatchNorm2d,
                     "2": BatchNormReLU2d}
    assert all(m.backend == "triton" and m.training == training for m in fused.modules() if isinstance(m, BatchNorm2d))
    assert type(model[0].bn1) is nn.BatchNorm2d  # the model itself is left as it was
    assert fused.get_submodule("0.bn2").weight is model[0].bn2.weight
    assert list(fused.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    y, expected = fused(x), reference(x)
    assert relative_error(y, expected.double()) <= 1e-5
    if training:
        y.sum().backward()
        expected.sum().backward()
        assert relative_error(model[0].bn2.weight.grad, reference[0].bn2.weight.grad.double()) <= 1e-4
        assert_same_state(reference, fused)


def test_convert_fuse_counts_resnet50s_blocks():
    import torchvision

    fused = convert(torchvision.models.resnet50(), "torch", fuse=True)
    kinds = [type(m) for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert (kinds.count(BatchNormReLU2d), kinds.count(BatchNormAddReLU2d), kinds.count(BatchNorm2d)) == (33, 16, 4)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(x)) if x.sum() > 0 else x  # control flow on a value: torch.fx cannot trace it


def test_convert_fuse_falls_back_to_the_swap_where_tracing_fails():
    model = Branchy()
    with pytest.warns(UserWarning, match="could not trace Branchy"):
        assert convert(model, "triton", fuse=True) is model
    assert type(model.bn) is BatchNorm2d and model.bn.backend == "triton"
