"""The CUDA module compiles without a GPU: for sm_80 and sm_90 with the installed PyTorch, and the same
source against PyTorch 2.1's headers (the oldest PyTorch promised)."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from experiments import sass
from bn2d import cuda_module

ROOT = Path(__file__).resolve().parents[1]
nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc")


@nvcc
def test_module_builds_and_imports_for_sm80_and_sm90(tmp_path):
    """A cold build in a fresh process and extension directory; the library holds sm_80 and sm_90 code."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), TORCH_CUDA_ARCH_LIST="8.0;9.0",
               PYTHONPATH=os.pathsep.join([str(ROOT / "kernels"), str(ROOT)]))
    code = "from bn2d import cuda_module; m = cuda_module.build(); print(m.__file__, *(getattr(m, f) for f in cuda_module.FUNCTIONS))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    library = run.stdout.split()[0]
    elves = subprocess.run([sass.cuobjdump(), "--list-elf", library], capture_output=True, text=True).stdout
    assert "sm_80" in elves and "sm_90" in elves, elves


@nvcc
@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_sass(arch):
    """No local memory: no spills (channels_last_kernel in bfloat16 spilled on sm_90 at the 64-register cap of
    1024-thread launch bounds, and took 1.4-6% longer than float16 for it: experiments/NOTES.md, "bfloat16
    channels_last: a spill at the 64-register cap") and no stack frame (a select in the 16-bit straddle walk
    put one there, 48 local loads and stores, and took 1.10-1.30x the time: experiments/NOTES.md, "The tiled
    kernel's straddle walk"), and the small kernels that measured one trip to memory per launch still
    issue every load before reading any: the 16-bit NCHW kernel once waited for x before loading its
    parameters, the float32 channels_last one for var before loading its weights (experiments/NOTES.md)."""
    kernels = sass.kernels(sass.source_at(), arch)
    local = {name: (k.spill_bytes, sass.local_accesses(k.instructions)) for name, k in kernels.items()}
    assert {name: spills for name, spills in local.items() if any(spills)} == {}
    for name in ("small_kernel<float, 4, false>", "small_kernel<__half, 8, false>",
                 "small_kernel<__nv_bfloat16, 8, false>", "small_channels_last_kernel<float, 4, 4>"):
        assert sass.late_loads(kernels[name].instructions) == 0, name


def compile_commands(include: Path, out: Path):
    """nvcc and g++ commands that compile the module's two sources as load_inline does on PyTorch 2.1
    (which has no no_implicit_headers: it prepends torch/extension.h and torch/types.h)."""
    functions = "\n".join(f'm.def("{f}", torch::wrap_pybind_function({f}), "{f}");' for f in cuda_module.FUNCTIONS)
    (out / "main.cpp").write_text("#include <torch/extension.h>\n" + cuda_module.CPP_SOURCE +
                                  f"\nPYBIND11_MODULE(bn2d_cuda, m) {{\n{functions}\n}}\n")
    (out / "cuda.cu").write_text("#include <torch/types.h>\n#include <cuda.h>\n#include <cuda_runtime.h>\n" +
                                 cuda_module.CUDA_SOURCE)
    includes = ["-isystem", str(include), "-isystem", str(include / "torch/csrc/api/include"),
                "-isystem", sysconfig.get_paths()["include"]]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc_cmd = [f"{cuda_home}/bin/nvcc", "-c", str(out / "cuda.cu"), "-o", str(out / "cuda.o"), *includes,
                "-std=c++17", "-O3", "--compiler-options", "-fPIC", "-D__CUDA_NO_HALF_OPERATORS__",
                "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    gxx_cmd = ["c++", "-c", str(out / "main.cpp"), "-o", str(out / "main.o"), *includes, "-isystem",
               f"{cuda_home}/include", "-std=c++17", "-fPIC", "-DTORCH_EXTENSION_NAME=bn2d_cuda",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-D_GLIBCXX_USE_CXX11_ABI=0"]
    return nvcc_cmd, gxx_cmd


@nvcc
@pytest.mark.skipif(not os.environ.get("BN2D_TORCH21_INCLUDE"),
                    reason="set BN2D_TORCH21_INCLUDE to PyTorch 2.1's include/ (.ci/torch21-headers fetches it)")
def test_source_compiles_against_pytorch_2_1_headers(tmp_path):
    include = Path(os.environ["BN2D_TORCH21_INCLUDE"])
    version = (include / "torch/csrc/api/include/torch/version.h").read_text()
    assert "TORCH_VERSION_MAJOR 2\n" in version and "TORCH_VERSION_MINOR 1\n" in version
    for cmd in compile_commands(include, tmp_path):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stderr[-4000:]
