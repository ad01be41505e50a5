"""The CUDA backend: every CUDA kernel of the project in one `load_inline` module, built once, on first use,
into PyTorch's extension cache, and the Python side of its calls.

The source lives in Python modules by concern, assembled here into the module's two files:

* ``cuda_header.py`` -- declarations both sides share, and the device and host helpers of every kernel;
* ``cuda_eval.py`` -- eval mode's normalisation kernels (NCHW, channels_last, small tensors, naive);
* ``cuda_training.py`` -- training mode's batch statistics and the kernels that read x once;
* ``cuda_backward.py`` -- training mode's backward (and frozen BatchNorm's), its kernels and binding;
* ``cuda_bindings.py`` -- the C++ side: checks, dtypes, the current stream, the bound functions;
* ``cuda_autograd.py`` -- training with autograd in one bound call, its backward an autograd node in C++.

The .cu file includes no ATen header, so nvcc compiles it quickly; the C++ file holds the tensor-facing side.
"""
import glob
import os
import sys

import torch

from . import cuda_autograd, cuda_backward, cuda_bindings, cuda_eval, cuda_header, cuda_training

_DECLARATIONS = (cuda_header.DECLARATIONS + cuda_eval.DECLARATIONS + cuda_training.DECLARATIONS
                 + cuda_backward.DECLARATIONS)
CUDA_SOURCE = (_DECLARATIONS + cuda_header.DEVICE + cuda_eval.KERNELS + cuda_training.KERNELS
               + cuda_backward.KERNELS)
CPP_SOURCE = _DECLARATIONS + cuda_bindings.SOURCE + cuda_backward.BINDINGS + cuda_autograd.SOURCE
FUNCTIONS = cuda_bindings.FUNCTIONS + cuda_backward.FUNCTIONS + cuda_autograd.FUNCTIONS


def arch_flags() -> list:
    """nvcc -gencode flags: none when TORCH_CUDA_ARCH_LIST is set (PyTorch then applies it), else sm_80 plus
    the GPUs present."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    archs = {(8, 0)}
    if torch.cuda.is_available():
        archs |= {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in sorted(archs)]


def cuda_home(guess):
    """The CUDA toolkit to build with: PyTorch's guess where it holds the runtime's headers, else (an nvcc on the
    PATH that is a wrapper script makes PyTorch guess its folder's parent) the first /usr/local/cuda* that does;
    CUDA_HOME, when set, as it is."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for home in [guess, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    raise RuntimeError(f"bn2d: the CUDA backend needs a CUDA toolkit, and none was found ({guess or 'no nvcc'} "
                       "holds no include/cuda_runtime_api.h); set CUDA_HOME to one")


def build(verbose: bool = False):
    """Compile (or load from PyTorch's extension cache) the CUDA module and return it."""
    from torch.utils import cpp_extension  # imported here: it looks for a CUDA toolkit as it loads

    cpp_extension.CUDA_HOME = cuda_home(cpp_extension.CUDA_HOME)
    kwargs = {}
    if "no_implicit_headers" in cpp_extension.load_inline.__code__.co_varnames:  # PyTorch >= 2.5
        kwargs["no_implicit_headers"] = True
    return cpp_extension.load_inline(
        name="bn2d_cuda",
        cpp_sources=CPP_SOURCE,
        cuda_sources=CUDA_SOURCE,
        functions=FUNCTIONS,
        extra_cuda_cflags=["-O3", *arch_flags()],
        verbose=verbose,
        **kwargs,
    )


_module = None


def module():
    """The compiled module, built on first use."""
    global _module
    if _module is None:
        print("bn2d: building the CUDA module (first use; cached afterwards) ...", file=sys.stderr, flush=True)
        _module = build()
    return _module


def normalize(x, y, weight, bias, mean, var, eps: float, plan, config):
    """y = x * scale[c] + shift[c] by an eval `plan` (dispatch.cuda_eval); x and y share strides."""
    max_blocks = config.blocks_per_sm * _sm_count(x.device) if config.blocks_per_sm else 0
    _check(module().normalize(x, y, weight, bias, mean, var, eps, plan.code, max_blocks))


def eval_forward(x, weight, bias, mean, var, eps: float, code: int):
    """Eval mode's hot path, one bound call: y for contiguous NCHW or channels_last CUDA x by the packed eval
    plan `code`, or None where anything is off (the general path then runs, or says what is wrong)."""
    return module().eval_forward(x, weight, bias, mean, var, eps, code)


def batch_stats(x, running_mean, running_var, momentum: float, plan):
    """Batch mean and biased variance per channel (float32; float64 for float64 input), and the running
    statistics updated in place as PyTorch does (when given), by a three-kernel training `plan`."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.empty(x.size(1), device=x.device, dtype=acc)
    var = torch.empty_like(mean)
    _check(module().batch_stats(x, mean, var, running_mean, running_var, momentum, plan.layout == "channels_last",
                                plan.launch["vec"], None))
    return mean, var


def fused_training(x, y, weight, bias, running_mean, running_var, momentum: float, eps: float, plan, save=None):
    """y = x normalised with its batch statistics, the running statistics updated, in one read of x by a
    read-once training `plan` (the module tells the block per channel from the group by x's memory layout);
    `save`: (mean, var) tensors for the batch mean and biased variance (not the persistent grid's)."""
    mean, var = save or (None, None)
    _check(module().fused_training(x, y, weight, bias, running_mean, running_var, momentum, eps,
                                   plan.kernels[0] != "fused_nchw_kernel", plan.launch["vec"], mean, var, None))


def autograd_launch(plans, backward_plan, config, device) -> tuple:
    """train_autograd's launch arguments from a training forward's plans (save=True: one read-once kernel, or the
    statistics and an eval plan) and the backward's plan (dispatch.cuda_backward), for x on `device`."""
    eval_plan = plans[1].code if len(plans) > 1 else -1
    max_blocks = config.blocks_per_sm * _sm_count(device) if config.blocks_per_sm else 0
    return (plans[0].launch["vec"], plans[0].layout == "channels_last", eval_plan, max_blocks,
            cuda_backward.kernel_name(backward_plan), backward_plan.layout == "channels_last")


def train_autograd(x, weight, bias, running_mean, running_var, count, momentum: float, eps: float, launch: tuple):
    """The training forward with autograd in one bound call (cuda_autograd.py): y, its grad_fn the backward
    kernels' C++ node where x, weight or bias needs a gradient, and the batch count `count` (a module's
    num_batches_tracked) incremented where given; `launch` from autograd_launch. Returns y and an error message
    (y None then), which nothing has changed before."""
    return module().train_autograd(x, weight, bias, running_mean, running_var, count, momentum, eps, *launch)


def _check(error: str):
    """The bound functions return an error message instead of raising (cuda_bindings.py says why)."""
    if error:
        raise RuntimeError(error)


_sm_counts = {}


def _sm_count(device) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]
