"""One shape's call (a forward; with --mode train_backward, forward and backward) on each backend, a few calls
each and no timing of its own, for a profiler to capture:

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy -k regex:'kernel|triton' \\
        python -m experiments.profile --shape 16x3x17x33 --dtype float16 --backends cuda cuda_naive torch_compile

With --torch-profiler, torch.profiler records the calls after the first, the host's side (each op and CUDA
runtime call) and the GPU's, and prints their table per backend:

    python -m experiments.profile --shape 1x64x56x56 --mode train_backward --backends torch cuda --calls 50 \
        --torch-profiler

The inputs and the calls are the sweep's (`experiments.sweep.make_inputs`, `make_fn`).
"""
import argparse
import contextlib

import torch

from experiments.sweep import BACKENDS, DTYPES, LAYOUTS, MODES, make_fn, make_inputs, parse_shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, required=True)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="nchw")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["cuda", "triton", "torch_compile"])
    parser.add_argument("--mode", choices=list(MODES), default="eval")
    parser.add_argument("--calls", type=int, default=2, help="calls per backend (the first builds or compiles)")
    parser.add_argument("--device", default="cuda", help="cpu: through the Triton interpreter (a smoke test)")
    parser.add_argument("--torch-profiler", action="store_true", help="print torch.profiler's table per backend")
    args = parser.parse_args(argv)
    x, params = make_inputs(args.shape, args.dtype, args.layout, args.device)
    dy = torch.randn_like(x)
    for backend in args.backends:
        fn = make_fn(backend, None, x, params, args.mode, dy)
        fn()
        with torch.profiler.profile() if args.torch_profiler else contextlib.nullcontext() as profile:
            for _ in range(args.calls - 1):
                fn()
            if x.is_cuda:
                torch.cuda.synchronize()
        print(f"{backend}: {args.calls} calls")
        if profile is not None:
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
