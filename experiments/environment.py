"""One capture of the environment a measurement or test log was made in, and the one writer of the results'
CSV files: one long-format file per family and GPU (``results/eval_h200.csv``), each row with a ``variant``
and the environment's columns."""
import csv
import datetime
import functools
import os
import re
import subprocess
from pathlib import Path

import torch
import triton


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def commit() -> str:
    """BN2D_COMMIT if set (for copies of the tree without .git), else HEAD, '+dirty' if the tree differs."""
    if os.environ.get("BN2D_COMMIT"):
        return os.environ["BN2D_COMMIT"]
    head = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _nvidia_smi(query: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        return ""
    return out.splitlines()[0] if out else ""


@functools.lru_cache(maxsize=None)
def _nvml_gpu0():
    """(pynvml, GPU 0's handle), initialised once; None without pynvml or an NVIDIA driver behind it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None


def clocks() -> dict:
    """The SM and memory clocks of GPU 0 now, in MHz (empty strings without an NVIDIA GPU). Read through NVML
    where pynvml is installed (microseconds), else through nvidia-smi."""
    nvml = _nvml_gpu0()
    if nvml:
        pynvml, handle = nvml
        sm, mem = (pynvml.nvmlDeviceGetClockInfo(handle, kind) for kind in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM))
    else:
        sm, _, mem = _nvidia_smi("clocks.sm,clocks.mem").partition(", ")
    return {"sm_clock_mhz": str(sm), "mem_clock_mhz": str(mem)}


def capture() -> dict:
    """GPU, driver, clocks (now and the maxima), library versions, commit and time, as flat strings."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    max_sm, _, max_mem = _nvidia_smi("clocks.max.sm,clocks.max.mem").partition(", ")
    return {
        "gpu_name": gpu,
        "driver": _nvidia_smi("driver_version"),
        **clocks(),
        "max_sm_clock_mhz": max_sm,
        "max_mem_clock_mhz": max_mem,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "commit": commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


RESULTS = Path(__file__).resolve().parent / "results"


def gpu_tag(gpu_name: str) -> str:
    """The GPU's short name for file names: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA A100-SXM4-40GB' ->
    'a100'; 'cpu' without a GPU."""
    if gpu_name in ("", "none"):
        return "cpu"
    words = [w for w in re.split(r"[\s-]+", gpu_name) if w.upper() not in ("NVIDIA", "GEFORCE", "RTX", "TESLA")]
    return next((w for w in words if re.search(r"\d", w)), words[0] if words else "gpu").lower()


def results_path(family: str, gpu_name: str = None) -> Path:
    """A family's CSV for this machine's GPU (or `gpu_name`): results/<family>_<gpu>.csv."""
    if gpu_name is None:
        gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return RESULTS / f"{family}_{gpu_tag(gpu_name)}.csv"


def done_keys(path: Path, key: list) -> set:
    """The `key` columns of every row already in `path` (none if it does not exist), as tuples of strings:
    what a resumed run skips."""
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        return {tuple(row[k] for k in key) for row in csv.DictReader(f)}


def append_csv(path: Path, rows: list, columns: list):
    """Append rows (dicts; keys outside `columns` are dropped) to a family's CSV, writing the header first if
    the file is new. A file with other columns is refused: one schema per file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f))
        if header != list(columns):
            raise ValueError(f"{path} has the columns {header}, not {list(columns)}: write to another file")
    new = not path.exists() or not path.stat().st_size
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_csv(path: Path, rows: list, env: dict, variant: str = "default"):
    """Rows of one run, each with its variant and the environment's columns, appended to `path`."""
    columns = [*rows[0], "variant", *env]
    append_csv(path, [dict(row, variant=variant, **env) for row in rows], columns)


if __name__ == "__main__":
    for key, value in capture().items():
        print(f"{key}: {value}")
