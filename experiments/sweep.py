"""Sweep: time each backend on each shape, dtype and layout against a device-to-device copy of the same
bytes, measured in the same process with the same timer. One long-format CSV row per measurement, appended to
the family's file for this GPU (experiments/results/eval_h200.csv; train_*, grid_* likewise).

    python -m experiments.sweep --preset quick                                # -> results/eval_<gpu>.csv
    python -m experiments.sweep --preset full --part 1/4
    python -m experiments.sweep --preset quick --modes train                  # -> results/train_<gpu>.csv
    python -m experiments.sweep --preset resnet50 --modes train_backward --backends cuda triton torch torch_compile
    python -m experiments.sweep --preset smoke --grid                         # -> results/grid_<gpu>.csv
    python -m experiments.sweep --preset quick --variant NAME   # one arm of an A/B (a flag, a patch, a revision)

Rows already in --out (same point, config, variant, timing and repeat) are skipped, so an interrupted sweep
resumes where it stopped, and a variant's rows join the default's in the same file.
"""
import argparse
import functools
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from tqdm import tqdm

from experiments.environment import append_csv, capture, clocks, done_keys, results_path
from experiments.shapes import PRESETS
from bn2d import CudaConfig, TritonConfig, batch_norm, bytes_moved
from bn2d.reference import batch_norm_error, batch_stats_reference, relative_error

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BACKENDS = ["cuda", "cuda_naive", "triton", "torch", "torch_nocudnn", "torch_compile"]
# What one call does, and the family file its rows go to: a forward with the running statistics; a training
# forward (batch statistics, the running ones updated); and the training forward and backward as a user calls
# them, `autograd.grad(batch_norm(x, ..., training=True), (x, weight, bias), dy)`.
MODES = {"eval": "eval", "train": "train", "train_backward": "train"}

# Vendor datasheet memory bandwidth (GB/s), matched against the GPU name.
DATASHEET_GBPS = [("A100-SXM4-40GB", 1555), ("A100-PCIE-40GB", 1555), ("A100", 2039), ("H100 PCIe", 2000),
                  ("H100", 3350), ("H200", 4800)]

# Milliseconds of timed calls per measurement (and a quarter of it of warm-up): at least 7 calls of the
# largest shape, thousands of the smallest.
WINDOW_MS = 40

# Shapes moving at most this many bytes in eval mode are also timed by CUDA-graph replay, where launch gaps
# vanish.
GRAPH_BYTES = 64 << 20

# Launch-parameter grids for the block-size heatmaps (with --grid: on the smoke shapes, or on all of --shapes).
CUDA_GRID = [CudaConfig(t, v, b) for t in (128, 256, 512, 1024) for v in (True, False) for b in (0, 4)]
CUDA_TRAINING_GRID = [CudaConfig(fused=0), CudaConfig(fused=1)]  # three kernels, or the fused one where it applies
TRITON_GRID = [TritonConfig(r, l, w) for r, l in ((1, 1024), (1, 4096), (2, 2048), (4, 1024), (8, 512), (16, 256),
                                                   (64, 64), (32, 256)) for w in (4, 8)]

COLUMNS = ["mode", "n", "c", "h", "w", "dtype", "layout", "backend", "config", "variant", "timing", "repeat",
           "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "copy_ms", "copy_gbps", "pct_of_copy", "datasheet_gbps",
           "rel_error", "gpu_name", "driver", "sm_clock_mhz", "mem_clock_mhz", "torch", "triton", "cuda", "commit",
           "timestamp"]
KEY = COLUMNS[:COLUMNS.index("repeat") + 1]  # what identifies a measurement, for resuming


def mode_bytes(shape, dtype, mode: str) -> int:
    """The bytes one call of `mode` moves, the numerator of its roofline: `bytes_moved` for the forwards (eval
    2 tensor passes, train 3); train_backward 8: x read twice and y written in the forward, x and dy read
    twice and dx written in the backward (fewer where a kernel keeps x or dy on chip, so above 100% there),
    and per-channel vectors as `bytes_moved` counts them, once each way."""
    if mode != "train_backward":
        return bytes_moved(shape, dtype, training=mode == "train")
    n, c, h, w = shape
    return 8 * n * c * h * w * torch.empty((), dtype=dtype).element_size() + 2 * 4 * c * 4


def datasheet_gbps(gpu_name: str) -> float:
    return next((gbps for key, gbps in DATASHEET_GBPS if key in gpu_name), float("nan"))


def time_ms(fn, timing: str, window_ms: int = WINDOW_MS):
    """(median, p20, p80) in ms over `window_ms` of calls: do_bench (L2 flushed before each call), CUDA-graph
    replay, or, on a machine without a GPU, one wall-clock call (a smoke test, not a timing)."""
    if timing == "cpu_wallclock":
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return ms, ms, ms
    if timing == "cudagraph":
        return triton.testing.do_bench_cudagraph(fn, rep=window_ms, quantiles=[0.5, 0.2, 0.8])
    return triton.testing.do_bench(fn, warmup=window_ms // 4, rep=window_ms, quantiles=[0.5, 0.2, 0.8])


def make_inputs(shape, dtype_name: str, layout: str, device):
    """Fresh random x (never zeros) in `layout`, and (mean, var, weight, bias) in float32."""
    x = torch.randn(shape, device=device).to(DTYPES[dtype_name]).contiguous(memory_format=LAYOUTS[layout])
    c = shape[1]
    params = (torch.randn(c, device=device), torch.rand(c, device=device) + 0.5, torch.randn(c, device=device),
              torch.randn(c, device=device))
    return x, params


def make_fn(backend, config, x, params, mode: str, dy=None):
    """A no-argument callable running one call of `mode` on `backend`. In the training modes params' mean and
    var are the running statistics, updated by every call; train_backward returns (dx, dweight, dbias) for the
    upstream gradient `dy`. torch_compile compiles the same function (forward, or forward and backward)."""
    bn = _batch_norm_on("torch" if backend == "torch_compile" else backend, config)
    mean, var, weight, bias = params
    if mode == "train_backward":
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))

        def step(x, mean, var, weight, bias, dy):
            y = bn(x, mean, var, weight, bias, training=True)
            return torch.autograd.grad(y, (x, weight, bias), dy)
        args = (x, mean, var, weight, bias, dy)
    else:
        def step(x, mean, var, weight, bias):
            return bn(x, mean, var, weight, bias, training=mode == "train")
        args = (x, mean, var, weight, bias)
    if backend == "torch_compile":
        step = torch.compile(step, dynamic=False)
    return lambda: step(*args)


def _batch_norm_on(backend, config):
    """F.batch_norm's signature on `backend` (torch_nocudnn: PyTorch with cuDNN disabled)."""
    if backend == "torch":
        return F.batch_norm
    if backend == "torch_nocudnn":
        def bn(*args, **kwargs):
            with torch.backends.cudnn.flags(enabled=False):
                return F.batch_norm(*args, **kwargs)
        return bn
    return functools.partial(batch_norm, backend=backend, config=config)


def rel_error(mode: str, out, x, params, dy=None) -> float:
    """The relative L2 error of a call's result against float64: y against the reference with the running
    statistics (eval) or the batch's (train); for train_backward the largest of dx's, dweight's and dbias's
    errors against float64 autograd of F.batch_norm on the same inputs."""
    if mode != "train_backward":
        stats = batch_stats_reference(x) if mode == "train" else params[:2]
        return batch_norm_error(out, x, *stats, *params[2:])
    x, weight, bias = (t.detach().double().requires_grad_() for t in (x, params[2], params[3]))
    y = F.batch_norm(x, None, None, weight, bias, training=True)
    return max(relative_error(got, ref) for got, ref in zip(out, torch.autograd.grad(y, (x, weight, bias),
                                                                                     dy.double())))


def parse_shape(text: str):
    shape = tuple(int(v) for v in text.lower().split("x"))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"expected NxCxHxW, got {text!r}")
    return shape


def points(args):
    """(shape, dtype, layout, backend, config, mode) in sweep order; configs other than the default only on grid
    shapes (launch configs in eval mode, fused or not in the training forward); the naive kernel in eval mode
    only."""
    shapes = args.shapes or PRESETS[args.preset]
    part, parts = map(int, args.part.split("/"))
    shapes = shapes[part - 1::parts]
    for shape, dtype, layout, mode, backend in itertools.product(shapes, args.dtypes, args.layouts, args.modes,
                                                                 args.backends):
        if backend == "cuda_naive" and (layout != "nchw" or mode != "eval"):
            continue
        configs = [None]
        if args.grid and (shape in PRESETS["smoke"] or args.shapes):
            grids = {"eval": {"cuda": CUDA_GRID, "triton": TRITON_GRID}, "train": {"cuda": CUDA_TRAINING_GRID}}
            grids = grids.get(mode, {})
            configs += grids.get(backend, [])
        for config in configs:
            yield shape, dtype, layout, backend, config, mode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="NxCxHxW shapes instead of the preset's")
    parser.add_argument("--part", default="1/1", help="K/P: the K-th of P interleaved parts of the shapes")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["eval"],
                        help="train: batch statistics, against the 3-pass roofline; train_backward: forward and "
                             "backward with autograd, against the 8-pass roofline")
    parser.add_argument("--grid", action="store_true",
                        help="also sweep launch configs (on the smoke shapes, or on all of --shapes)")
    parser.add_argument("--repeats", type=int, default=1, help="independent timings of each point (error bars)")
    parser.add_argument("--variant", default="default",
                        help="the A/B variant these rows measure (a flag, a patch, another revision's source), "
                             "written to the variant column")
    parser.add_argument("--out", type=Path,
                        help="default: results/<family>_<gpu>.csv, the family grid with --grid, else the modes'")
    parser.add_argument("--device", default="cuda", help="cpu: run through the Triton interpreter, untimed")
    args = parser.parse_args(argv)
    if args.out is None:
        families = {"grid"} if args.grid else {MODES[mode] for mode in args.modes}
        if len(families) > 1:
            parser.error(f"--modes {' '.join(args.modes)} belong to the families {sorted(families)}: give --out")
        args.out = results_path(families.pop())
    torch._dynamo.config.cache_size_limit = 1024  # one compiled graph per shape, dtype and layout

    done = done_keys(args.out, KEY)
    env = capture()
    peak = datasheet_gbps(env["gpu_name"])
    todo = list(points(args))
    copies = {}
    for shape, dtype_name, layout, backend, config, mode in tqdm(todo, desc="sweep", mininterval=5):
        copy_bytes = bytes_moved(shape, DTYPES[dtype_name])
        nbytes = mode_bytes(shape, DTYPES[dtype_name], mode)
        if args.device == "cpu":
            timings = ["cpu_wallclock"]
        else:
            timings = ["do_bench", "cudagraph"] if copy_bytes <= GRAPH_BYTES else ["do_bench"]
        config_str = "default" if config is None else repr(config)
        rows = [dict(mode=mode, n=shape[0], c=shape[1], h=shape[2], w=shape[3], dtype=dtype_name, layout=layout,
                     backend=backend, config=config_str, variant=args.variant, timing=timing, repeat=repeat)
                for timing, repeat in itertools.product(timings, range(args.repeats))]
        rows = [row for row in rows if tuple(str(row[k]) for k in KEY) not in done]
        if not rows:  # resumed: measured already
            continue
        x, params = make_inputs(shape, dtype_name, layout, args.device)
        dy = torch.randn_like(x) if mode == "train_backward" else None
        fn = make_fn(backend, config, x, params, mode, dy)
        error = rel_error(mode, fn(), x, params, dy)
        for row in rows:
            copy_key = (shape, dtype_name, layout, row["timing"], row["repeat"])
            if copy_key not in copies:
                y = torch.empty_like(x)
                copies[copy_key] = time_ms(functools.partial(y.copy_, x), row["timing"])[0]
            median, p20, p80 = time_ms(fn, row["timing"])
            copy_ms = copies[copy_key]
            roof_ms = copy_ms * nbytes / copy_bytes  # the call's bytes at the copy's bandwidth
            row.update(env)
            row.update(median_ms=median, p20_ms=p20, p80_ms=p80, bytes=nbytes, gbps=nbytes / median / 1e6,
                       copy_ms=copy_ms, copy_gbps=copy_bytes / copy_ms / 1e6, pct_of_copy=100 * roof_ms / median,
                       datasheet_gbps=peak, rel_error=error, **clocks())  # the clocks just after the timing
            append_csv(args.out, [row], COLUMNS)
        del x, fn, dy
    if args.device != "cpu":  # a CPU run checks the sweep, it times nothing
        summary(args.out, args.variant)


def summary(path: Path, variant: str = "default"):
    """Print % of the roofline per shape for the default configs of `variant`, one column per backend: by
    CUDA-graph replay where the shape has it, else by do_bench (as the README's tables)."""
    import pandas as pd

    from experiments.plot import device_times, load_sweep

    df = load_sweep([path], variant=variant)
    table = pd.concat([device_times(df, mode).assign(mode=mode) for mode in df["mode"].unique()]).pivot_table(
        index=["mode", "shape", "dtype", "layout"], columns="backend", values="pct_of_copy")
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_columns", 20,
                           "display.float_format", "{:.0f}".format):
        print(f"% of copy bandwidth (training modes: of their passes at the copy's speed), variant {variant} "
              f"({path}):")
        print(table)


if __name__ == "__main__":
    main()
