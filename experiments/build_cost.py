"""Build and JIT cost: the CUDA module's cold build and warm load, Triton's first-call JIT with an empty and
a warm cache. Each measurement runs in a fresh process, as a user's first call would.

    python -m experiments.build_cost                  # appends to experiments/results/build_<gpu>.csv
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.environment import capture, results_path, write_csv

ROOT = Path(__file__).resolve().parents[1]

# Each snippet prints the seconds of the step it measures (imports excluded).
CUDA_BUILD = """
import time
from bn2d import cuda_module
t = time.perf_counter(); cuda_module.build(); print(time.perf_counter() - t)
"""
TRITON_FIRST_CALL = """
import time, torch
from bn2d import batch_norm
x = torch.randn(8, 64, 28, 28, device="cuda"); p = [torch.rand(64, device="cuda") + 0.5 for _ in range(4)]
torch.cuda.synchronize()
t = time.perf_counter(); batch_norm(x, *p, backend="triton"); torch.cuda.synchronize(); print(time.perf_counter() - t)
"""


def timed(snippet: str, env: dict) -> float:
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="default: experiments/results/build_<gpu>.csv")
    parser.add_argument("--variant", default="default", help="the A/B variant these rows measure")
    parser.add_argument("--extensions-dir", type=Path, help="an empty directory to build in (kept afterwards)")
    args = parser.parse_args(argv)
    environment = capture()
    with tempfile.TemporaryDirectory() as ext, tempfile.TemporaryDirectory() as cache:
        ext = args.extensions_dir or ext
        if any(Path(ext).iterdir()):
            raise SystemExit(f"{ext} is not empty: the build would not be cold")
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), TRITON_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        rows = [
            ("cuda", "cold build", timed(CUDA_BUILD, env)),
            ("cuda", "warm load", timed(CUDA_BUILD, env)),
            ("triton", "cold first call", timed(TRITON_FIRST_CALL, env)),
            ("triton", "warm first call", timed(TRITON_FIRST_CALL, env)),
        ]
    for backend, step, seconds in rows:
        print(f"{backend:7s} {step:16s} {seconds:7.2f} s")
    rows = [dict(backend=backend, step=step, seconds=seconds, cpu_count=os.cpu_count())
            for backend, step, seconds in rows]
    write_csv(args.out or results_path("build"), rows, environment, args.variant)


if __name__ == "__main__":
    main()
