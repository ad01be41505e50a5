"""One capture of the environment a measurement or test log was made in."""
import csv
import datetime
import functools
import os
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


def write_csv(path: Path, rows: list, env: dict):
    """Rows of one run, each with the environment's columns, as a whole CSV file (the sweep instead appends
    row by row, so that it can resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], *env])
        writer.writeheader()
        writer.writerows(dict(row, **env) for row in rows)


if __name__ == "__main__":
    for key, value in capture().items():
        print(f"{key}: {value}")
