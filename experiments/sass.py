"""The CUDA module's kernels as machine code (SASS), without a GPU: nvcc compiles the kernels' source for one
architecture, its resource report gives each kernel's registers and spills, and cuobjdump disassembles it.
With --base, which kernels' SASS differs from another git revision's: the check a change to a latency-bound
kernel needs even when it changes no result (experiments/NOTES.md, "A refactor that cost the channels_last
small kernel 7%").

    python -m experiments.sass                            # per kernel: instructions, loads, late loads,
                                                          # registers, spills, local-memory accesses
    python -m experiments.sass --base f6a31f4 --arch 80   # ... and whether each differs from f6a31f4's
    python -m experiments.sass --rev 0f403a3 --base c18c3e6   # the kernels at 0f403a3 against c18c3e6's
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CUDA_BIN = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")


class Kernel(NamedTuple):
    instructions: List[str]  # without addresses and encodings
    registers: int
    spill_bytes: int  # stores and loads


def cuobjdump() -> str:
    """The toolkit's cuobjdump, else the copy Triton ships."""
    toolkit = CUDA_BIN / "cuobjdump"
    if toolkit.exists():
        return str(toolkit)
    import triton.backends.nvidia

    return str(Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump")


def source_at(rev: str = "") -> str:
    """The kernels' CUDA source at a git revision (the package's source of that revision, `kernels/bn2d`, or
    `kernels/cuda_kernels.py` before it); the working tree's for ''."""
    if not rev:
        from bn2d import cuda_module

        return cuda_module.CUDA_SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "kernels"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        package = Path(tmp, "kernels", "bn2d").is_dir()
        code = ("from bn2d.cuda_module import CUDA_SOURCE" if package else
                "from kernels.cuda_kernels import CUDA_SOURCE") + "; print(CUDA_SOURCE, end='')"
        path = str(Path(tmp, "kernels")) if package else tmp
        return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=path),
                              capture_output=True, text=True, check=True).stdout


def kernels(source: str, arch: str = "90") -> dict:
    """{kernel name: Kernel} for `source` compiled for sm_`arch` with load_inline's nvcc flags, names demangled
    (`small_kernel<float, 4, true>`)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    with tempfile.TemporaryDirectory() as tmp:
        cu, obj = Path(tmp, "kernels.cu"), Path(tmp, "kernels.o")
        cu.write_text(source)
        report = subprocess.run([str(CUDA_BIN / "nvcc"), *COMMON_NVCC_FLAGS, "-std=c++17", "-O3", "-c", str(cu),
                                 "-o", str(obj), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    resources, name = {}, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            resources[name] = [0, int(m.group(1)) + int(m.group(2))]
        elif m := re.search(r"Used (\d+) registers", line):
            resources[name][0] = int(m.group(1))
    code, name = {}, None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            name = m.group(1)
            code[name] = []
        elif name and (m := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.+?)\s*;", line)) and m.group(1) != "NOP":
            code[name].append(re.sub(r"0x[0-9a-f]+", "ADDR", m.group(1)))  # branch targets move with any edit
    mangled = sorted(code)
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    short = [re.sub(r"^void |\(.*$", "", re.sub(r"bn2d::|\(anonymous namespace\)::", "", d)) for d in demangled]
    return {s: Kernel(code[m], *resources[m]) for s, m in zip(short, mangled)}


def split(instruction: str):
    """(opcode with its modifiers, operands) of a SASS instruction, its predicate dropped."""
    op, _, operands = re.sub(r"^@!?U?P\w+\s+", "", instruction).partition(" ")
    return op, operands.split(", ")


def local_accesses(instructions: List[str]) -> int:
    """Loads from and stores to local memory: spills, and values the compiler keeps in a stack frame (which
    ptxas does not count as spills)."""
    return sum(split(i)[0].split(".")[0] in ("LDL", "STL") for i in instructions)


def is_load(op: str) -> bool:
    """A global load into registers (LDG.E.128, not cp.async's LDGSTS)."""
    return op.split(".")[0] == "LDG"


def late_loads(instructions: List[str]) -> int:
    """Global loads issued after the first instruction that reads an earlier load's result. In a kernel that
    goes once from its loads to its stores each of them is one more trip to memory (a loop's later loads are
    counted too: there they are the next iteration's)."""
    loaded, waited, late = set(), False, 0
    for instruction in instructions:
        op, parts = split(instruction)
        if is_load(op):
            late += waited
            first = int(re.match(r"R(\d+)", parts[0]).group(1))
            loaded.update(range(first, first + (4 if ".128" in op else 2 if ".64" in op else 1)))
            continue
        sources = parts[1:] if re.match(r"R\d+$", parts[0]) else parts  # a register written is not read
        waited |= any(int(r) in loaded for r in re.findall(r"\bR(\d+)", ", ".join(sources)))
    return late


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="compute capability without the dot: 80, 90")
    parser.add_argument("--rev", default="", help="the git revision to list (default: the working tree)")
    parser.add_argument("--base", help="a git revision to compare with")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    new = kernels(source_at(args.rev), args.arch)
    old = kernels(source_at(args.base), args.arch) if args.base else {}
    print(f"{'kernel (sm_' + args.arch + ')':64s} {'instr':>6s} {'LDG':>4s} {'LDG.128':>7s} {'late LDG':>8s} "
          f"{'regs':>4s} {'spill':>5s} {'LDL/STL':>7s}" + ("  vs " + args.base if args.base else ""))
    for name, k in new.items():
        if args.kernels not in name:
            continue
        loads = [op for op, _ in map(split, k.instructions) if is_load(op)]
        wide = [op for op in loads if ".128" in op]
        versus = "" if not args.base else "  new" if name not in old else (
            "  same" if old[name].instructions == k.instructions else "  differs")
        print(f"{name:64s} {len(k.instructions):6d} {len(loads):4d} {len(wide):7d} {late_loads(k.instructions):8d} "
              f"{k.registers:4d} {k.spill_bytes:5d} {local_accesses(k.instructions):7d}{versus}")


if __name__ == "__main__":
    main()
