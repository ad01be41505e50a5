"""BatchNorm2d and convert against nn.BatchNorm2d: state, train/eval, running statistics, gradients, errors."""
import copy

import pytest
import torch
from conftest import BACKENDS, DEVICE, TOLERANCE
from torch import nn

from bn2d import BatchNorm2d, batch_norm, convert, kernelbench
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
