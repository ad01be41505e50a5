"""One interface over the backends: ``batch_norm`` (PyTorch's ``F.batch_norm`` plus ``backend=``, ``config=``
and ``out=``) and ``normalize`` (the per-channel affine map the kernels compute, differentiable).

Backends: ``"cuda"`` (the load_inline module), ``"cuda_naive"`` (its one-thread-per-element starting point,
contiguous NCHW only), ``"triton"``, and ``"torch"`` (PyTorch's own ``F.batch_norm``).
"""
import os
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_kernels, triton_kernels
from .cuda_kernels import CudaConfig
from .triton_kernels import TritonConfig

BACKENDS = ("cuda", "cuda_naive", "triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CONFIGS = {"cuda": CudaConfig, "cuda_naive": CudaConfig, "triton": TritonConfig}
_DEFAULT_CONFIGS = {backend: [int(v) for v in cls()] for backend, cls in CONFIGS.items()}


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: str = "cuda", config=None,
               out: Optional[Tensor] = None) -> Tensor:
    """BatchNorm2d with the semantics of ``torch.nn.functional.batch_norm``.

    Eval mode normalises with the running statistics; training mode (or no running statistics) with the
    batch statistics, and updates the running statistics in place as PyTorch does. ``config`` holds a
    backend's launch parameters (a ``CudaConfig``/``TritonConfig`` or a dict of its fields; ``None`` is the
    tuned default). ``out`` receives the result (it may be ``input`` itself); it must have the shape, dtype
    and strides of the result. CPU tensors go through PyTorch, except the Triton backend under
    ``TRITON_INTERPRET=1``.
    """
    # Eval mode's hot path on the CUDA backend: one bound call checks, allocates and launches (a small tensor
    # costs its host time). None sends the call down the general path below.
    if (backend == "cuda" and not training and config is None and out is None and isinstance(input, Tensor)
            and _runs_kernels(input, backend) and not _is_compiling()):
        y = cuda_kernels.eval_forward(input, weight, bias, running_mean, running_var, eps)
        if y is not None:
            return y
    _check_inputs(input, running_mean, running_var, weight, bias, backend)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode (training=False)")
    if training:
        _check_batch_size(input)
    if not _runs_kernels(input, backend) or input.numel() == 0:
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return y if out is None else out.copy_(y)
    mean, var = running_mean, running_var
    if training:
        input, layout = _layout(input, backend)  # once: input in other strides is copied here, not per kernel
        if backend != "cuda_naive" and out is None and not _needs_grad(input, weight, bias):
            kernels = _kernels(backend)
            kernel = kernels.read_once(input, layout, _config_list(backend, config))
            if kernel:
                y = torch.empty_like(input)
                kernels.fused_training(input, y, weight, bias, running_mean, running_var, momentum, eps, kernel)
                return y
        mean, var = _batch_stats(input, layout, running_mean, running_var, momentum, backend)
    return _normalize(input, mean, var, weight, bias, eps, backend, config, out)


def normalize(input: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: str = "cuda", config=None,
              out: Optional[Tensor] = None) -> Tensor:
    """``(input - mean) / sqrt(var + eps) * weight + bias`` per channel, on a kernel backend.

    Differentiable in every tensor argument (without ``out``), and one op (``bn2d::normalize``) to
    ``torch.compile`` where the installed PyTorch has ``torch.library.custom_op``.
    """
    _check_inputs(input, mean, var, weight, bias, backend)
    if backend == "torch":
        raise ValueError("normalize runs the kernel backends; use batch_norm for backend='torch'")
    return _normalize(input, mean, var, weight, bias, eps, backend, config, out)


def _normalize(input, mean, var, weight, bias, eps, backend, config, out):
    """normalize on checked arguments."""
    config = _config_list(backend, config)
    needs_grad = _needs_grad(input, mean, var, weight, bias)
    if out is None:
        # The registered op serves autograd and torch.compile; plain eager calls skip its dispatch cost.
        traced = needs_grad or _is_compiling()
        return (_normalize_op if traced else _normalize_impl)(input, mean, var, weight, bias, eps, backend, config)
    if needs_grad:
        raise RuntimeError("bn2d: out= does not support automatic differentiation; call without out=")
    x, layout = _layout(input, backend)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
        raise ValueError(f"out must have the result's shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device} "
                         f"and strides {x.stride()}; got {tuple(out.shape)}, {out.dtype}, {out.device}, {out.stride()}")
    _launch(x, out, layout, mean, var, weight, bias, eps, backend, config)
    return out


def bytes_moved(shape, dtype, param_bytes: int = 4, training: bool = False) -> int:
    """The bytes a forward moves: x read once and y written once, plus four per-channel vectors; in training
    x is read twice (statistics, then normalisation) unless it stays on chip in between."""
    n, c, h, w = shape
    passes = 3 if training else 2
    return passes * n * c * h * w * torch.empty((), dtype=dtype).element_size() + 4 * c * param_bytes


def output_like(input: Tensor, backend: str = "cuda") -> Tensor:
    """An uninitialised tensor with the layout of the result for ``input``."""
    return torch.empty_like(_layout(input, backend)[0])


def _layout(x: Tensor, backend: str):
    """The kernel for x's memory layout, and x in a layout it reads (copied only for other strides).

    Contiguous NCHW goes to the plane kernel; channels_last, and NCHW with 1x1 planes (the same memory),
    to the channels_last kernel. Other strides are copied to channels_last if C is the innermost dim,
    else to contiguous NCHW. The naive kernel reads contiguous NCHW only.
    """
    if backend == "cuda_naive":
        if not x.is_contiguous():
            raise ValueError("the cuda_naive backend reads contiguous NCHW input only")
        return x, "naive"
    if x.is_contiguous():
        return x, ("nchw" if x.size(2) * x.size(3) > 1 else "channels_last")
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, "channels_last"
    fmt = torch.channels_last if x.stride(1) == 1 else torch.contiguous_format
    return _layout(x.contiguous(memory_format=fmt), backend)


def _kernels(backend: str):
    return triton_kernels if backend == "triton" else cuda_kernels


def _launch(x, y, layout, mean, var, weight, bias, eps, backend, config: List[int]):
    _kernels(backend).normalize(x, y, weight, bias, mean, var, eps, layout, config)


def _normalize_impl(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, backend: str, config: List[int]) -> Tensor:
    x, layout = _layout(x, backend)
    y = torch.empty_like(x)
    _launch(x, y, layout, mean, var, weight, bias, eps, backend, config)
    return y


def _normalize_fake(x, mean, var, weight, bias, eps, backend, config):
    return output_like(x, backend)


def _normalize_backward(grad, x, mean, var, weight, eps, needs):
    """Gradients of y = (x - mean) * rsqrt(var + eps) * weight + bias, in float32 (float64 for float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, -1, 1, 1)
    invstd = torch.rsqrt(var.to(acc) + eps)
    w = weight.to(acc) if weight is not None else torch.ones_like(invstd)
    scale = w * invstd
    g = grad.to(acc)
    dx = (g * scale.view(shape)).to(x.dtype) if needs[0] else None
    dshift = g.sum((0, 2, 3))
    dscale = (g * (x.to(acc) - mean.to(acc).view(shape))).sum((0, 2, 3))  # d/d(scale) with mean folded in
    dmean = (-scale * dshift).to(mean.dtype) if needs[1] else None
    dvar = (-0.5 * dscale * w * invstd ** 3).to(var.dtype) if needs[2] else None
    dweight = (dscale * invstd).to(weight.dtype) if weight is not None and needs[3] else None
    dbias = dshift.to(x.dtype if weight is None else weight.dtype) if needs[4] else None
    return dx, dmean, dvar, dweight, dbias


if hasattr(torch.library, "custom_op"):  # PyTorch >= 2.4: one op for autograd and torch.compile
    _normalize_op = torch.library.custom_op("bn2d::normalize", _normalize_impl, mutates_args=())
    _normalize_op.register_fake(_normalize_fake)

    def _setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps, backend, config = inputs
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps = eps

    def _backward(ctx, grad):
        x, mean, var, weight = ctx.saved_tensors
        return (*_normalize_backward(grad, x, mean, var, weight, ctx.eps, ctx.needs_input_grad), None, None, None)

    _normalize_op.register_autograd(_backward, setup_context=_setup_context)
else:  # older PyTorch: autograd only; torch.compile sees a graph break
    class _Normalize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, mean, var, weight, bias, eps, backend, config):
            ctx.save_for_backward(x, mean, var, weight)
            ctx.eps = eps
            return _normalize_impl(x, mean, var, weight, bias, eps, backend, config)

        @staticmethod
        def backward(ctx, grad):
            x, mean, var, weight = ctx.saved_tensors
            return (*_normalize_backward(grad, x, mean, var, weight, ctx.eps, ctx.needs_input_grad), None, None, None)

    _normalize_op = _Normalize.apply


def _batch_stats(x: Tensor, layout: str, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 momentum: float, backend: str):
    """Batch mean and biased variance (float32, float64 for float64 input) of x, laid out as `layout` by
    _layout; updates the running statistics with the unbiased variance, as PyTorch does. By the backend's
    kernels, unless x needs a gradient (then by PyTorch ops, which autograd differentiates) or the backend is
    the naive kernel (eval only)."""
    if backend != "cuda_naive" and not _needs_grad(x):
        return _kernels(backend).batch_stats(x, layout, running_mean, running_var, momentum)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
    if running_mean is not None:
        n = x.numel() // x.size(1)
        with torch.no_grad():
            running_mean.copy_(running_mean.to(acc) * (1 - momentum) + mean * momentum)
            running_var.copy_(running_var.to(acc) * (1 - momentum) + var * (momentum * n / (n - 1)))
    return mean, var


def _config_list(backend: str, config) -> List[int]:
    """The backend's launch parameters as a list of ints (0 fields take the default)."""
    cls = CONFIGS[backend]
    if config is None:
        return _DEFAULT_CONFIGS[backend]
    if isinstance(config, dict):
        config = cls(**config)
    elif not isinstance(config, cls):
        raise TypeError(f"config for backend {backend!r} must be a {cls.__name__} or a dict of its fields, "
                        f"got {type(config).__name__}")
    return [int(v) for v in config]


# Looked up once: it is asked on every call.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _runs_kernels(x: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    return x.is_cuda or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


def _check_inputs(x, mean, var, weight, bias, backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    if x.dtype not in DTYPES:
        raise TypeError(f"unsupported input dtype {x.dtype}; expected float32, float16, bfloat16 or float64")
    # One combined test per tensor on the hot path; the diagnosis only when it fails.
    shape, device, dtypes = (x.size(1),), x.device, (torch.float32, x.dtype)
    for name, t in (("running_mean", mean), ("running_var", var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != shape or t.device != device or t.dtype not in dtypes):
            _diagnose(name, t, x)
    for names, a, b in (("running_mean and running_var", mean, var), ("weight and bias", weight, bias)):
        if a is not None and b is not None and a.dtype != b.dtype:
            raise TypeError(f"{names} must share one dtype, got {a.dtype} and {b.dtype}")


def _diagnose(name: str, t: Tensor, x: Tensor):
    """Raise the error that says what is wrong with per-channel tensor `t` for input `x`."""
    if t.shape != (x.size(1),):
        raise ValueError(f"{name} should have {x.size(1)} elements (one per channel of the input), "
                         f"got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    raise TypeError(f"{name} has dtype {t.dtype}; expected float32 or the input's dtype {x.dtype}")


def _check_batch_size(x: Tensor):
    if x.size(1) and x.numel() // x.size(1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
