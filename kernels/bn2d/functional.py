"""One interface over the backends: ``batch_norm`` (PyTorch's ``F.batch_norm`` plus ``backend=``, ``config=``
and ``out=``) and ``normalize`` (the per-channel affine map the kernels compute, differentiable).

Backends: ``"cuda"`` (the load_inline module), ``"cuda_naive"`` (its one-thread-per-element starting point,
contiguous NCHW only), ``"triton"``, and ``"torch"`` (PyTorch's own ``F.batch_norm``).
"""
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_backward, cuda_module, dispatch, triton_backward, triton_kernels
from .dispatch import CudaConfig, Plan, TritonConfig

BACKENDS = ("cuda", "cuda_naive", "triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = (None, "relu")
CONFIGS = {"cuda": CudaConfig, "cuda_naive": CudaConfig, "triton": TritonConfig}


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: str = "cuda", config=None,
               out: Optional[Tensor] = None, activation: Optional[str] = None,
               residual: Optional[Tensor] = None) -> Tensor:
    """BatchNorm2d with the semantics of ``torch.nn.functional.batch_norm``.

    Eval mode normalises with the running statistics; training mode (or no running statistics) with the
    batch statistics, and updates the running statistics in place as PyTorch does. ``config`` holds a
    backend's launch parameters (a ``CudaConfig``/``TritonConfig`` or a dict of its fields; ``None`` is the
    tuned default). ``out`` receives the result (it may be ``input`` itself); it must have the shape, dtype
    and strides of the result. CPU tensors go through PyTorch, except the Triton backend under
    ``TRITON_INTERPRET=1``. ``explain`` tells which kernels a call runs.

    ``residual`` (a tensor of the input's shape, dtype and device) is added to the result and ``activation``
    (``None`` or ``"relu"``) applied after: ``relu(batch_norm(...) + residual)``, a ResNet block's end, as one
    op (for now the add and the ReLU run as PyTorch's ops after the BatchNorm kernels; ``explain`` says so).
    """
    if activation is not None or residual is not None:
        _check_epilogue(input, activation, residual)
        y = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, backend=backend,
                       config=config, out=out)
        return _epilogue(y, activation, residual, in_place=out is not None)
    # Eval mode's hot path on the CUDA backend: one plan per shape, kept, and one bound call that checks,
    # allocates and launches (a small tensor costs its host time). None sends the call down the general path.
    if (backend == "cuda" and not training and config is None and out is None and isinstance(input, Tensor)
            and _runs_kernels(input, backend) and not _is_compiling()):
        key = (input.shape, input.dtype, input.is_contiguous())
        code = _HOT_PLANS.get(key)
        if code is None and input.dim() == 4 and input.numel():
            code = _HOT_PLANS[key] = dispatch.cuda_eval(input, weight, bias, running_mean, running_var,
                                                        pointers=False).code
        if code is not None:
            y = cuda_module.eval_forward(input, weight, bias, running_mean, running_var, eps, code)
            if y is not None:
                return y
    if backend == "cuda" and training and config is None and out is None:
        y = _cuda_train_hot(input, weight, bias, running_mean, running_var, momentum, eps)
        if y is not None:
            return y
    _check_call(input, running_mean, running_var, weight, bias, training, backend)
    if not _runs_kernels(input, backend) or input.numel() == 0:
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return y if out is None else out.copy_(y)
    config = _config(backend, config)
    if not training:
        return _normalize(input, running_mean, running_var, weight, bias, eps, backend, config, out)
    if _needs_grad(input, weight, bias) or _is_compiling():
        if out is not None:
            raise RuntimeError("bn2d: out= does not support automatic differentiation; call without out=")
        if backend == "cuda" and not _is_compiling():
            return _cuda_train(input, weight, bias, running_mean, running_var, momentum, eps, config)
        return _Train.apply(input, weight, bias, running_mean, running_var, momentum, eps, backend, list(config))
    x = _dense(input, backend)  # once: input in other strides is copied here, not per kernel
    y = torch.empty_like(x) if out is None else _checked_out(out, x)
    _train(x, y, weight, bias, running_mean, running_var, momentum, eps, backend, config)
    return y


def explain(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
            weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False, *,
            backend: str = "cuda", config=None, out: Optional[Tensor] = None, activation: Optional[str] = None,
            residual: Optional[Tensor] = None) -> List[Plan]:
    """The plans ``batch_norm`` with these arguments runs, in order: which kernels, with which launch
    parameters, on which memory layout, and why; where autograd records the call, the backward's plan last.
    Nothing is launched."""
    if activation is not None or residual is not None:
        _check_epilogue(input, activation, residual)
        ops = (("add",) if residual is not None else ()) + ((activation,) if activation else ())
        epilogue = Plan("torch", "epilogue", dispatch.layout_of(input), ops, {},
                        "PyTorch's ops after the BatchNorm: not fused into its kernels yet")
        plans = explain(input, running_mean, running_var, weight, bias, training, backend=backend, config=config,
                        out=out)
        backward = [p for p in plans if p.op == "backward"]
        return [p for p in plans if p.op != "backward"] + [epilogue] + backward
    _check_call(input, running_mean, running_var, weight, bias, training, backend)
    if not _runs_kernels(input, backend) or input.numel() == 0:
        return [Plan("torch", "train" if training else "eval", dispatch.layout_of(input), ("F.batch_norm",), {},
                     "PyTorch's own: " + ("the torch backend" if backend == "torch" else
                                          "an empty input" if input.numel() == 0 else "a tensor on the CPU"))]
    config = _config(backend, config)
    x = _dense(input, backend)
    grad = _needs_grad(x, weight, bias)
    plans = ([_eval_plan(x, running_mean, running_var, weight, bias, out, backend, config)] if not training else
             list(_train_plans(x, out, weight, bias, backend, config, save=grad)))
    return plans + [_backward_plan(x, backend)] if grad else plans


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
    """normalize on checked arguments and a config object."""
    if out is None:
        # The registered op serves autograd and torch.compile; plain eager calls skip its dispatch cost.
        if _needs_grad(input, mean, var, weight, bias):
            return _Normalize.apply(input, mean, var, weight, bias, eps, backend, list(config))
        return (_normalize_op if _is_compiling() else _normalize_impl)(input, mean, var, weight, bias, eps, backend,
                                                                       list(config))
    if _needs_grad(input, mean, var, weight, bias):
        raise RuntimeError("bn2d: out= does not support automatic differentiation; call without out=")
    x = _dense(input, backend)
    _launch(x, _checked_out(out, x), mean, var, weight, bias, eps, backend, config)
    return out


def _check_epilogue(x, activation, residual):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if residual is None or not isinstance(x, Tensor):  # a non-tensor input: batch_norm's own checks say so
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must have the input's shape {tuple(x.shape)}, dtype {x.dtype} and device "
                         f"{x.device}; got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")


def _epilogue(y, activation, residual, in_place: bool):
    """y + residual, then the activation: in y itself for out=, else new tensors (which autograd records)."""
    if residual is not None:
        y = y.add_(residual) if in_place else y + residual
    if activation == "relu":
        y = y.relu_() if in_place else torch.relu(y)
    return y


def _checked_out(out: Tensor, x: Tensor) -> Tensor:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride() != x.stride():
        raise ValueError(f"out must have the result's shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device} "
                         f"and strides {x.stride()}; got {tuple(out.shape)}, {out.dtype}, {out.device}, {out.stride()}")
    return out


def bytes_moved(shape, dtype, param_bytes: int = 4, training: bool = False) -> int:
    """The bytes a forward moves: x read once and y written once, plus four per-channel vectors; in training
    x is read twice (statistics, then normalisation) unless it stays on chip in between."""
    n, c, h, w = shape
    passes = 3 if training else 2
    return passes * n * c * h * w * torch.empty((), dtype=dtype).element_size() + 4 * c * param_bytes


def output_like(input: Tensor, backend: str = "cuda") -> Tensor:
    """An uninitialised tensor with the layout of the result for ``input``."""
    return torch.empty_like(_dense(input, backend))


def _dense(x: Tensor, backend: str) -> Tensor:
    """x in a memory layout the kernels read: contiguous NCHW or channels_last as they are; other strides
    copied to channels_last if C is the innermost dim, else to contiguous NCHW (the naive kernel reads
    contiguous NCHW only)."""
    if x.is_contiguous() or (backend != "cuda_naive" and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    if backend == "cuda_naive":
        raise ValueError("the cuda_naive backend reads contiguous NCHW input only")
    return x.contiguous(memory_format=torch.channels_last if x.stride(1) == 1 else torch.contiguous_format)


def _eval_plan(x, mean, var, weight, bias, out, backend, config) -> Plan:
    if backend == "triton":
        return dispatch.triton_eval(x, config)
    if backend == "cuda_naive":
        return dispatch.cuda_naive(x)
    return dispatch.cuda_eval(x, weight, bias, mean, var, out, config)


def _train_plan(x, out, backend, config, save: bool = False) -> Plan:
    """The training-forward plan; `save`: one that gives the batch statistics (for the backward). The naive
    backend has no training kernels of its own: the CUDA module's statistics, then its eval kernel."""
    if backend == "cuda_naive":
        return dispatch.cuda_train(x, None, CudaConfig(fused=0))
    if backend == "triton":
        return dispatch.triton_train(x)
    return dispatch.cuda_train(x, out, config, save)


def _launch(x, y, mean, var, weight, bias, eps, backend, config, plan=None):
    """y = x normalised with mean and var by an eval plan (None: planned here for these tensors)."""
    plan = plan or _eval_plan(x, mean, var, weight, bias, y, backend, config)
    _kernels(backend).normalize(x, y, weight, bias, mean, var, eps, plan, *(() if backend == "triton" else (config,)))


def _kernels(backend: str):
    return triton_kernels if backend == "triton" else cuda_module


def _backward_kernels(backend: str):
    return triton_backward if backend == "triton" else cuda_backward


def _backward_plan(x, backend) -> Plan:
    return dispatch.triton_backward(x) if backend == "triton" else dispatch.cuda_backward(x)


def _memory_format(x):
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _train(x, y, weight, bias, running_mean, running_var, momentum, eps, backend, config, save: bool = False):
    """The training forward of dense x into y by the plans' kernels; with `save`, returns the batch mean and
    biased variance (which the backward needs)."""
    key = (backend, config, save, x.shape, x.stride(), x.dtype, *(t.data_ptr() % dispatch.VEC_BYTES
                                                                  for t in (x, y, weight, bias) if t is not None))
    plans = _TRAIN_PLANS.get(key)
    if plans is None:
        plans = _TRAIN_PLANS[key] = _train_plans(x, y, weight, bias, backend, config, save)
    kernels = _kernels(backend)
    if len(plans) == 1:
        stats = _stats_like(x) if save else None
        kernels.fused_training(x, y, weight, bias, running_mean, running_var, momentum, eps, plans[0],
                               *(() if stats is None else (stats,)))
        return stats
    mean, var = kernels.batch_stats(x, running_mean, running_var, momentum, plans[0])
    _launch(x, y, mean, var, weight, bias, eps, backend, config, plans[1])
    return mean, var


def _cuda_train(x, weight, bias, running_mean, running_var, momentum, eps, config):
    """The CUDA backend's training forward with autograd, eager: one bound call, whose backward is a C++
    autograd node (cuda_autograd.py), by launch arguments kept per what the plans depend on."""
    x = _dense(x, "cuda")
    key = _autograd_key(x, weight, bias, config)
    launch = _AUTOGRAD_LAUNCHES.get(key)
    if launch is None:
        launch = _AUTOGRAD_LAUNCHES[key] = cuda_module.autograd_launch(
            _train_plans(x, None, weight, bias, "cuda", config, True), dispatch.cuda_backward(x), config, x.device)
    y, error = cuda_module.train_autograd(x, weight, bias, running_mean, running_var, None, momentum, eps, launch)
    cuda_module._check(error)
    return y


def _cuda_train_hot(input, weight, bias, running_mean, running_var, momentum, eps, count=None):
    """Training with autograd's hot path, the CUDA backend's, eager, default config: the launch kept per shape
    and one bound call that checks, launches and records the backward (changing nothing where a check fails);
    `count`, a module's num_batches_tracked, incremented by the kernels. None where the call takes the general
    path (no launch kept for it yet, no gradient needed, or torch.compile tracing)."""
    if not (isinstance(input, Tensor) and input.is_cuda and _needs_grad(input, weight, bias)) or _is_compiling():
        return None
    launch = _AUTOGRAD_LAUNCHES.get(_autograd_key(input, weight, bias, _CUDA_DEFAULTS))
    if launch is None:
        return None
    y, error = cuda_module.train_autograd(input, weight, bias, running_mean, running_var, count, momentum, eps, launch)
    if error:  # the clearer message, where the general checks find the problem
        _check_call(input, running_mean, running_var, weight, bias, True, "cuda")
        raise RuntimeError(error)
    return y


def _autograd_key(x, weight, bias, config) -> tuple:
    """What _cuda_train's launch depends on: the config, x's shape, strides, dtype and device, and every tensor's
    alignment."""
    return (config, x.shape, x.stride(), x.dtype, x.get_device(), x.data_ptr() % dispatch.VEC_BYTES,
            None if weight is None else weight.data_ptr() % dispatch.VEC_BYTES,
            None if bias is None else bias.data_ptr() % dispatch.VEC_BYTES)


def _train_plans(x, y, weight, bias, backend, config, save):
    """The training forward's plans: one read-once kernel's, or the statistics' and then an eval plan (for
    fresh batch statistics: aligned)."""
    plan = _train_plan(x, y, backend, config, save)
    return (plan,) if len(plan.kernels) == 1 else (plan, _eval_plan(x, None, None, weight, bias, y, backend, config))


def _stats_like(x):
    """Empty batch mean and variance for x: float32, float64 for float64 input."""
    mean = x.new_empty(x.size(1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return mean, torch.empty_like(mean)


def _normalize_impl(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, backend: str, config: List[int]) -> Tensor:
    x = _dense(x, backend)
    y = torch.empty_like(x)
    _launch(x, y, mean, var, weight, bias, eps, backend, CONFIGS[backend](*config))
    return y


def _normalize_fake(x, mean, var, weight, bias, eps, backend, config):
    return output_like(x, backend)


class _Normalize(torch.autograd.Function):
    """y = normalize(x, ...) to autograd: frozen BatchNorm's gradients by the backend's kernels; those of the
    statistics (which a module's buffers never need) by PyTorch ops."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, backend, config):
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps, ctx.backend, ctx.bias_dtype = eps, backend, None if bias is None else bias.dtype
        return (_normalize_op if _is_compiling() else _normalize_impl)(x, mean, var, weight, bias, eps, backend,
                                                                       config)

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight = ctx.saved_tensors
        needs_x, needs_mean, needs_var, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        if needs_mean or needs_var:
            grads = _statistics_backward(dy, x, mean, var, weight, ctx.eps, ctx.needs_input_grad)
        else:
            dx, dweight, dbias = _backward(dy, x, mean, var, weight, ctx.eps, False, needs_x, needs_weight,
                                           needs_bias, ctx.backend, ctx.bias_dtype)
            grads = dx, None, None, dweight, dbias
        return (*grads, None, None, None)


class _Train(torch.autograd.Function):
    """The training forward to autograd (Triton's and cuda_naive's, and every backend's under torch.compile;
    the CUDA backend's eager one is _cuda_train): y by the backend's kernels, which also update the running
    statistics and give the batch statistics the backward kernels take."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, backend, config):
        y, mean, var = (_train_op if _is_compiling() else _train_impl)(x, weight, bias, running_mean, running_var,
                                                                       momentum, eps, backend, config)
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps, ctx.backend, ctx.bias_dtype = eps, backend, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grads = _backward(dy, x, mean, var, weight, ctx.eps, True, needs_x, needs_weight, needs_bias, ctx.backend,
                          ctx.bias_dtype)
        return (*grads, None, None, None, None, None, None)


def _statistics_backward(grad, x, mean, var, weight, eps, needs):
    """Gradients of y = (x - mean) * rsqrt(var + eps) * weight + bias, in float32 (float64 for float64), with
    those of mean and var."""
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


def _train_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float, eps: float, backend: str,
                config: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """The training forward as autograd records it: y, and the batch mean and biased variance it saves."""
    x = _dense(x, backend)
    y = torch.empty_like(x)
    mean, var = _train(x, y, weight, bias, running_mean, running_var, momentum, eps, backend,
                       CONFIGS[backend](*config), save=True)
    return y, mean, var


def _train_fake(x, weight, bias, running_mean, running_var, momentum, eps, backend, config):
    return output_like(x, backend), *_stats_like(x)


def _backward(dy, x, mean, var, weight, eps, training, needs_x, needs_weight, needs_bias, backend, bias_dtype):
    """(dx, dweight, dbias) by the backward op, None where not asked."""
    if not (needs_x or needs_weight or needs_bias):
        return None, None, None
    if torch.is_grad_enabled() and not _is_compiling():  # autograd.grad(..., create_graph=True)
        _no_double_backward(None)
    op = _backward_op if _is_compiling() else _backward_impl
    dx, dweight, dbias = op(dy, x, mean, var, weight, eps, training, needs_x, needs_weight and weight is not None,
                            needs_bias, backend)
    if needs_bias and dbias.dtype != bias_dtype:  # no weight, so the kernels chose x's dtype
        dbias = dbias.to(bias_dtype)
    return (dx if needs_x else None, dweight if needs_weight and weight is not None else None,
            dbias if needs_bias else None)


def _backward_impl(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float,
                   training: bool, needs_x: bool, needs_weight: bool, needs_bias: bool,
                   backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward by the backend's kernels: dx (in x's dense layout), dweight, dbias; an empty tensor for
    each one not asked for (a registered op returns tensors)."""
    x = _dense(x, backend)
    dy = dy if dy.stride() == x.stride() else dy.contiguous(memory_format=_memory_format(x))
    key = (backend, x.shape, x.stride(), x.dtype)
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS[key] = _backward_plan(x, backend)
    grads = _backward_kernels(backend).backward(dy, x, mean, var, weight, eps, training,
                                                (needs_x, needs_weight, needs_bias), plan)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _backward_fake(dy, x, mean, var, weight, eps, training, needs_x, needs_weight, needs_bias, backend):
    c, dtype = x.size(1), x.dtype if weight is None else weight.dtype
    return (output_like(x, backend) if needs_x else x.new_empty(0),
            x.new_empty(c, dtype=dtype) if needs_weight else x.new_empty(0),
            x.new_empty(c, dtype=dtype) if needs_bias else x.new_empty(0))


def _no_double_backward(ctx, *grads):
    raise RuntimeError("bn2d: the BatchNorm backward is not differentiable (double backward, e.g. "
                       "autograd.grad(..., create_graph=True) through it, is not supported)")


def _register(name, impl, fake, mutates_args=()):
    """impl as one op to torch.compile, with its fake (torch.library.custom_op, PyTorch >= 2.4; before that,
    impl itself, which torch.compile cannot trace into)."""
    if not hasattr(torch.library, "custom_op"):
        return impl
    op = torch.library.custom_op(name, impl, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


_normalize_op = _register("bn2d::normalize", _normalize_impl, _normalize_fake)
_train_op = _register("bn2d::batch_norm_train", _train_impl, _train_fake, mutates_args=("running_mean", "running_var"))
_backward_op = _register("bn2d::batch_norm_backward", _backward_impl, _backward_fake)
if hasattr(_backward_op, "register_autograd"):
    _backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _config(backend: str, config):
    """The backend's launch parameters as its config class (None: the defaults)."""
    cls = CONFIGS.get(backend)
    if cls is None or config is None:
        return cls() if cls else None
    if isinstance(config, dict):
        return cls(**config)
    if not isinstance(config, cls):
        raise TypeError(f"config for backend {backend!r} must be a {cls.__name__} or a dict of its fields, "
                        f"got {type(config).__name__}")
    return config


# The hot path's eval plans, by (shape, dtype, contiguous): planned for aligned pointers (cuda_eval says why).
_HOT_PLANS = {}
# Training's plans, by what they depend on: the call's backend, config and save, x's shape, strides and dtype,
# and every tensor's alignment (planning was about a sixth of a small layer's fwd+bwd Python time in a CPU
# profile with the kernels stubbed out, before 7e28ceb).
_TRAIN_PLANS = {}
_BACKWARD_PLANS = {}
_AUTOGRAD_LAUNCHES = {}
_CUDA_DEFAULTS = CudaConfig()

# Looked up once: it is asked on every call.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _runs_kernels(x: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if x.is_cuda or backend != "triton" or os.environ.get("TRITON_INTERPRET") != "1":
        return x.is_cuda
    if not _INTERPRETED:
        raise RuntimeError("bn2d: TRITON_INTERPRET=1 was set after bn2d was imported, so its Triton kernels were "
                           "compiled for a GPU; set it before importing bn2d (in the shell, or first in the script)")
    return True


# Triton decides at a kernel's definition whether its interpreter runs it: here, as bn2d is imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _check_call(x, running_mean, running_var, weight, bias, training, backend):
    _check_inputs(x, running_mean, running_var, weight, bias, backend)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode (training=False)")
    if training:
        _check_batch_size(x)


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
