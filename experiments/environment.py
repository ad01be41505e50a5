"""One capture of the environment a measurement or test log was made in."""
import datetime
import os
import subprocess

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


def capture() -> dict:
    """GPU, driver, clocks, library versions, commit and time, as flat strings."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    clocks = _nvidia_smi("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem").split(", ")
    return {
        "gpu_name": gpu,
        "driver": _nvidia_smi("driver_version"),
        "sm_clock_mhz": clocks[0] if len(clocks) == 4 else "",
        "mem_clock_mhz": clocks[1] if len(clocks) == 4 else "",
        "max_sm_clock_mhz": clocks[2] if len(clocks) == 4 else "",
        "max_mem_clock_mhz": clocks[3] if len(clocks) == 4 else "",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "commit": commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    for key, value in capture().items():
        print(f"{key}: {value}")
