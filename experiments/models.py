"""End to end: torchvision models with their BatchNorm2d layers on each backend, timed in eval and in a
training step (forward, backward, SGD with momentum), against eager PyTorch, torch.compile of the model, and
(eval) the model with every BatchNorm folded into its convolution. One row per measurement, appended to
experiments/results/models_<gpu>.csv.

    python -m experiments.models                                   # ResNet-50: every configuration and backend
    python -m experiments.models --tasks train --backends torch cuda triton
    python -m experiments.models --device cpu --models resnet18 --image 32 --batch 2 --backends torch   # smoke
    python -m experiments.models --tasks train --dtypes float32 --backends torch cuda --profile   # no rows
    python -m experiments.models --tasks train --backends torch cuda --timing cudagraph --variant cudagraph

With --profile each configuration is not timed but profiled (torch.profiler over a few steps): its wall time per
step, the GPU's busy time per step, and the ops that take the most GPU and host time. With --timing cudagraph
each step is replayed from a CUDA graph: the GPU's time alone, which a host-bound step hides.

Weights random, BatchNorm running statistics and affine parameters randomised; input and labels random.
rel_error: the output's (eval) or the parameter gradients' (train, every parameter's concatenated) relative L2
error against a float64 copy of the model on the same input. Rows already in --out are skipped (resume).
Needs torchvision (the experiments extra).
"""
import argparse
import copy
import inspect
import itertools
import time
from pathlib import Path
from typing import Callable, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from experiments.environment import append_csv, capture, done_keys, results_path
from experiments.sweep import DTYPES, LAYOUTS, time_ms
from bn2d import convert
from bn2d.reference import relative_error

# (task, dtype, layout, batch): float32 NCHW, and mixed precision (torch.autocast to dtype, parameters float32)
# in channels_last, as each task is run in practice.
CONFIGS = [
    ("eval", "float32", "nchw", 32),
    ("eval", "float16", "channels_last", 64),
    ("eval", "bfloat16", "channels_last", 256),
    ("train", "float32", "nchw", 32),
    ("train", "bfloat16", "channels_last", 64),
]


class Backend(NamedTuple):
    prepare: Callable  # a copy of the eager model, in its task's mode and layout -> the model to time
    tasks: Tuple[str, ...] = ("eval", "train")


def fold(model):
    """Every Conv2d -> BatchNorm2d pair as one Conv2d (torch.fx), as inference deployments run: eval only."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


BACKENDS = {
    "torch": Backend(lambda model: model),
    "cuda": Backend(lambda model: convert(model, "cuda")),
    "triton": Backend(lambda model: convert(model, "triton")),
    "torch_compile": Backend(torch.compile),
    "torch_folded": Backend(fold, ("eval",)),
}
if "fuse" in inspect.signature(convert).parameters:  # BN+ReLU and BN+add+ReLU as one kernel, where bn2d has them
    BACKENDS["cuda_fused"] = Backend(lambda model: convert(model, "cuda", fuse=True))
    BACKENDS["triton_fused"] = Backend(lambda model: convert(model, "triton", fuse=True))

COLUMNS = ["model", "task", "dtype", "layout", "batch", "backend", "variant", "median_ms", "p20_ms", "p80_ms",
           "rel_error", "gpu_name", "driver", "torch", "triton", "cuda", "commit", "timestamp"]
KEY = COLUMNS[:COLUMNS.index("variant") + 1]  # what identifies a measurement, for resuming

# Milliseconds of timed steps per measurement: 100 or more steps of a ResNet-50 training step on an H200.
WINDOW_MS = 3000


def make_model(name: str, device, seed: int = 0) -> torch.nn.Module:
    """A torchvision model with random weights, its BatchNorm2d layers' running statistics and affine
    parameters randomised (so that no layer is an identity and folding changes every convolution)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.to(device)


def make_inputs(batch: int, layout: str, image: int, device, seed: int = 0):
    """A random image batch in `layout` and random labels."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=LAYOUTS[layout])
    return x, torch.randint(0, 1000, (batch,), device=device)


def loss_backward(model, x, target, dtype: str):
    """Forward (under autocast to `dtype` unless float32) and backward of the cross-entropy loss."""
    with torch.autocast(x.device.type, DTYPES[dtype], enabled=dtype != "float32"):
        loss = F.cross_entropy(model(x), target)
    loss.backward()


def make_step(model, task: str, dtype: str, x, target):
    """One step of `task`: an inference forward, or zero_grad, forward, backward and an SGD-with-momentum step."""
    if task == "eval":
        def step():
            with torch.no_grad(), torch.autocast(x.device.type, DTYPES[dtype], enabled=dtype != "float32"):
                return model(x)
        return step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_backward(model, x, target, dtype)
        optimizer.step()
    return step


def result(model, task: str, dtype: str, x, target) -> torch.Tensor:
    """What rel_error compares: the output (eval), or every parameter's gradient after one forward and
    backward, concatenated in float64 (train)."""
    if task == "eval":
        return make_step(model, task, dtype, x, target)()
    model.zero_grad(set_to_none=True)
    loss_backward(model, x, target, dtype)
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def measure(base, backend: str, task: str, dtype: str, layout: str, x, target, expected, timing, window_ms):
    """(median, p20, p80, rel_error) of `backend` on a copy of `base`."""
    model = copy.deepcopy(base).to(memory_format=LAYOUTS[layout]).train(task == "train")
    model = BACKENDS[backend].prepare(model)
    error = relative_error(result(model, task, dtype, x, target), expected)  # also the warm-up (compiles, builds)
    median, p20, p80 = time_ms(make_step(model, task, dtype, x, target), timing, window_ms)
    return median, p20, p80, error


def profile(base, backend: str, task: str, dtype: str, layout: str, x, target, steps: int = 5, rows: int = 15):
    """Print `backend`'s step on a copy of `base`: wall time per step (timed alone), the GPU's kernel time per
    step (torch.profiler), and the ops with the most GPU time and the most host time."""
    model = BACKENDS[backend].prepare(copy.deepcopy(base).to(memory_format=LAYOUTS[layout]).train(task == "train"))
    step = make_step(model, task, dtype, x, target)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
        sync()
    averages = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"== {backend}: wall {wall_ms:.2f} ms per step, GPU kernels {gpu_ms / steps / 1e3:.2f} ms per step")
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=70))


def points(args):
    """(model, task, dtype, layout, batch, backend) in run order: the configurations of CONFIGS chosen by
    --tasks and --dtypes, each with every chosen backend that runs its task."""
    for model, (task, dtype, layout, batch), backend in itertools.product(args.models, CONFIGS, args.backends):
        if task in args.tasks and dtype in args.dtypes and task in BACKENDS[backend].tasks:
            yield model, task, dtype, layout, args.batch or batch, backend


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50"], help="torchvision model names")
    parser.add_argument("--tasks", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--batch", type=int, help="every configuration at this batch size instead of its own")
    parser.add_argument("--image", type=int, default=224, help="input height and width")
    parser.add_argument("--window-ms", type=int, default=WINDOW_MS, help="milliseconds of timed steps per row")
    parser.add_argument("--variant", default="default", help="the A/B variant these rows measure")
    parser.add_argument("--out", type=Path, help="default: experiments/results/models_<gpu>.csv")
    parser.add_argument("--device", default="cuda", help="cpu: one untimed step per row (a smoke test)")
    parser.add_argument("--profile", action="store_true", help="profile each configuration instead of timing it")
    parser.add_argument("--timing", choices=["do_bench", "cudagraph"], default="do_bench",
                        help="cudagraph: each step replayed from a CUDA graph, the GPU's time alone without the host's "
                             "(name the rows' --variant for it)")
    args = parser.parse_args(argv)
    args.out = args.out or results_path("models")
    torch._dynamo.config.cache_size_limit = 64
    timing = "cpu_wallclock" if args.device == "cpu" else args.timing

    done = set() if args.profile else done_keys(args.out, KEY)
    todo = [p for p in points(args) if tuple(map(str, p)) + (args.variant,) not in done]
    env = capture()
    bar = tqdm(total=len(todo), desc="models")
    for (name, task, dtype, layout, batch), group in itertools.groupby(todo, key=lambda p: p[:5]):
        base = make_model(name, args.device)
        x, target = make_inputs(batch, layout, args.image, args.device)
        if args.profile:
            for *_, backend in group:
                print(f"{name} {task} {dtype} {layout} batch {batch}")
                profile(base, backend, task, dtype, layout, x, target)
            continue
        reference = copy.deepcopy(base).double().train(task == "train")
        expected = result(reference, task, "float32", x.double().contiguous(), target)
        del reference
        for *_, backend in group:
            bar.set_postfix_str(f"{name} {task} {dtype} {layout} {batch} {backend}")
            median, p20, p80, error = measure(base, backend, task, dtype, layout, x, target, expected, timing,
                                              args.window_ms)
            append_csv(args.out, [dict(env, model=name, task=task, dtype=dtype, layout=layout, batch=batch,
                                       backend=backend, variant=args.variant, median_ms=median, p20_ms=p20,
                                       p80_ms=p80, rel_error=error)], COLUMNS)
            torch._dynamo.reset()
            if args.device != "cpu":
                torch.cuda.empty_cache()
            bar.update()
    bar.close()
    if not args.profile:
        summary(args.out, args.variant)


def summary(path: Path, variant: str = "default"):
    """Median step time per configuration, one column per backend, with its ratio to eager PyTorch's."""
    import pandas as pd

    df = pd.read_csv(path)
    df = df[df.variant == variant]
    keys = ["model", "task", "dtype", "layout", "batch"]
    table = df.pivot_table(index=keys, columns="backend", values="median_ms")
    if "torch" in table:
        ratios = table.div(table["torch"], axis=0)
        table = table.apply(lambda col: col.map("{:.2f}".format) + ratios[col.name].map(" ({:.2f}x)".format))
        table = table.where(ratios.notna(), "")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(f"median ms per step (x eager), variant {variant} ({path}):")
        print(table)


if __name__ == "__main__":
    main()
