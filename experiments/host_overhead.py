"""Host overhead of one eager call: back-to-back calls on a small tensor (1x64x56x56), wall clock per call,
against a bare ``x.clone()`` (the floor for any op that allocates its output). On a small tensor the GPU
finishes each kernel before the host has launched the next, so the time per call is the host's. Eval calls
run under inference mode, as a deployment does; "train fwd+bwd" is a training module's forward and
backward with autograd (``y = bn(x); y.backward(dy)``), as a training step calls it, with the floor of any
training op written as a Python ``autograd.Function`` beside it (one that only allocates its outputs).

    python -m experiments.host_overhead                   # appends to experiments/results/host_<gpu>.csv
"""
import argparse
import contextlib
import functools
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from experiments.environment import capture, results_path, write_csv
from bn2d import (BatchNorm2d, batch_norm, cuda_backward, cuda_module, dispatch, functional, triton_backward,
                  triton_kernels)


class CloneModule(torch.nn.Module):
    """A module whose forward is ``x.clone()``: the floor of any module call that allocates its output."""

    def forward(self, x):
        return x.clone()


class EmptyFunction(torch.autograd.Function):
    """An autograd.Function in Python whose forward and backward only allocate their outputs."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.empty_like(dy), *(torch.empty(dy.size(1), device=dy.device) for _ in range(2))


class EmptyFunctionModule(torch.nn.BatchNorm2d):
    """A BatchNorm2d whose forward is EmptyFunction: the floor of a training op written as a Python
    autograd.Function (its fwd+bwd with no kernel)."""

    def forward(self, x):
        return EmptyFunction.apply(x, self.weight, self.bias)


def cases(x, backends):
    """(name, backend, callable) for every call measured."""
    c = x.size(1)
    stats = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
    reference = torch.nn.BatchNorm2d(c).to(x.device).eval()
    yield "clone", "torch", x.clone
    clone_module = CloneModule()
    yield "nn.Module(clone)", "torch", lambda: clone_module(x)
    yield "empty_like", "torch", lambda: torch.empty_like(x)
    yield "F.batch_norm", "torch", lambda: F.batch_norm(x, *stats)
    yield "nn.BatchNorm2d", "torch", lambda: reference(x)
    with torch.inference_mode(False):
        leaf, running = x.clone().requires_grad_(), tuple(t.clone() for t in stats)
    # The functional training forward that records its node: the C++ side of nn.BatchNorm2d's.
    yield "train F.batch_norm", "torch", lambda: _outside_inference(F.batch_norm, leaf, *running, None, None, True)
    for part in ("fwd+bwd", "fwd", "bwd"):
        yield f"train {part}", "torch", train_step(torch.nn.BatchNorm2d, x, part)
        yield f"train {part} (empty Function)", "torch", train_step(EmptyFunctionModule, x, part)
    for backend in backends:
        for part in ("fwd+bwd", "fwd", "bwd"):
            yield f"train {part}", backend, train_step(functools.partial(BatchNorm2d, backend=backend), x, part)
        module = BatchNorm2d(c, backend=backend).to(x.device).eval()
        out = torch.empty_like(x)
        yield "BatchNorm2d", backend, lambda module=module: module(x)
        yield "batch_norm", backend, lambda backend=backend: batch_norm(x, *stats, backend=backend)
        yield "batch_norm(out=)", backend, lambda backend=backend, out=out: batch_norm(x, *stats, backend=backend, out=out)
        if functional._runs_kernels(x, backend):
            # The layer under batch_norm: the backend's launch alone (its binding or JIT launcher, and the kernel).
            config = functional._config(backend, None)
            plan = functional._eval_plan(x, *stats, None, None, out, backend, config)
            launch = functional._kernels(backend).normalize
            args = (x, out, None, None, *stats, 1e-5, plan, *(() if backend == "triton" else (config,)))
            yield "launch", backend, lambda launch=launch, args=args: launch(*args)
        if backend == "cuda" and x.is_cuda:
            # The hot path's bound call crossing into C++ and back with no work: a CPU input is refused at
            # its first check.
            bound, cpu = cuda_module.module().eval_forward, x.cpu()
            yield "binding", backend, lambda: bound(cpu, None, None, *stats, 1e-5, 0)
            # The training forward's bound call for an input that needs no grad (no node): checks, its three
            # allocations and the launch.
            config = functional._config(backend, None)
            plans = functional._train_plans(x, None, None, None, backend, config, True)
            launch = cuda_module.autograd_launch(plans, dispatch.cuda_backward(x), config, x.device)
            yield "train binding", backend, lambda launch=launch: cuda_module.train_autograd(
                x, None, None, *stats, None, 0.1, 1e-5, launch)
            # The same call for a leaf that needs a grad: the C++ node recorded too (and freed with y).
            yield "train binding (node)", backend, lambda launch=launch, leaf=leaf, running=running: _outside_inference(
                cuda_module.train_autograd, leaf, None, None, *running, None, 0.1, 1e-5, launch)
            # Its launch alone, into tensors allocated once; and the backward's bound call on the plan's kernel.
            if len(plans) == 1:
                saved = functional._stats_like(x)
                yield "train launch", backend, lambda plan=plans[0], saved=saved: cuda_module.fused_training(
                    x, out, None, None, *stats, 0.1, 1e-5, plan, saved)
            mean, var = functional._stats_like(x)
            mean.zero_(), var.fill_(1)
            backward_plan, dy = dispatch.cuda_backward(x), torch.randn_like(x)
            yield "backward launch", backend, lambda: cuda_backward.backward(dy, x, mean, var, None, 1e-5, True,
                                                                             (True, False, True), backward_plan)


def _outside_inference(fn, *args):
    with torch.inference_mode(False):
        return fn(*args)


def train_step(make_module, x, part="fwd+bwd"):
    """A training module's forward and backward, outside inference mode: the module (make_module(C)), a leaf
    copy of x that needs a grad, and dy made there. `part` "fwd": the forward alone (its graph dropped); "bwd":
    the backward alone, of one forward's graph, kept (retain_graph)."""
    with torch.inference_mode(False):
        module = make_module(x.size(1)).to(x.device)
        x = x.clone().requires_grad_()
        dy = torch.randn_like(x)
        y = module(x) if part == "bwd" else None

    def step():
        with torch.inference_mode(False):
            if part == "fwd":
                module(x)
            elif part == "bwd":
                y.backward(dy, retain_graph=True)
            else:
                module(x).backward(dy)
    return step


def per_call_us(fns, calls: int, repeats: int, sync):
    """For each callable: median, p20 and p80 over repeats of the mean wall-clock time per call, in
    microseconds. The callables take turns within each repeat, so that a change in the host's speed during the
    run reaches all of them alike."""
    for fn in fns:  # warm-up: builds, JIT, allocator
        for _ in range(calls):
            fn()
    sync()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times.append((time.perf_counter() - start) / calls * 1e6)
    quantiles = [statistics.quantiles(t, n=5) if len(t) > 1 else t * 4 for t in samples]
    return [(statistics.median(t), q[0], q[3]) for t, q in zip(samples, quantiles)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1x64x56x56")
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--python-only", action="store_true",
                        help="the kernel call stubbed out and every tensor sent down the kernels' path: the Python "
                             "side of a call alone, on any device")
    parser.add_argument("--out", type=Path, help="default: experiments/results/host_<gpu>.csv")
    parser.add_argument("--variant", help="the A/B variant these rows measure (default: 'default', or "
                                          "'python_only' with --python-only)")
    args = parser.parse_args(argv)
    x = torch.randn(*map(int, args.shape.split("x")), device=args.device)  # outside inference mode: train_step's
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    env = capture()
    rows = []
    with torch.inference_mode(), contextlib.ExitStack() as stubs:
        if args.python_only:
            stubs.enter_context(mock.patch.object(functional, "_runs_kernels", lambda x, backend: backend != "torch"))
            for kernels in (cuda_module, triton_kernels):
                stubs.enter_context(mock.patch.object(kernels, "normalize", lambda *launch: None))
                stubs.enter_context(mock.patch.object(kernels, "fused_training", lambda *launch: None))
                stubs.enter_context(mock.patch.object(kernels, "batch_stats",
                                                      lambda x, *launch: functional._stats_like(x)))
            for kernels in (cuda_backward, triton_backward):
                stubs.enter_context(mock.patch.object(kernels, "backward", lambda dy, x, mean, var, weight, *launch: (
                    torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean))))
            stubs.enter_context(mock.patch.object(cuda_module, "eval_forward", lambda x, *args: x))
            # The C++ autograd node's stand-in: a clone's.
            stubs.enter_context(mock.patch.object(cuda_module, "train_autograd", lambda x, *args: (x.clone(), "")))
        names, backends, fns = zip(*cases(x, args.backends))
        timings = per_call_us(fns, args.calls, args.repeats, sync)
        for name, backend, (median, p20, p80) in zip(names, backends, timings):
            rows.append(dict(call=name, backend=backend, shape=args.shape, us_per_call=median, p20_us=p20, p80_us=p80))
    if x.is_cuda:  # a cudaMalloc per call would be host time of its own
        print("device memory segments allocated in the run:", torch.cuda.memory_stats()["segment.all.allocated"])
    floor = rows[0]["us_per_call"]
    for row in rows:
        row["ratio_to_clone"] = row["us_per_call"] / floor
        print(f"{row['call']:30s} {row['backend']:7s} {row['us_per_call']:8.1f} us  "
              f"{row['ratio_to_clone']:5.2f}x clone")
    variant = args.variant or ("python_only" if args.python_only else "default")
    write_csv(args.out or results_path("host"), rows, env, variant)


if __name__ == "__main__":
    main()
