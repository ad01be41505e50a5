"""The experiment pipeline without a GPU: shapes, the sweep's CSV (through the Triton interpreter, untimed),
and every figure from a small committed CSV."""
import csv
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import DEVICE, HAS_GPU

from experiments import host_overhead, kernelbench, plot, profile, sweep
from experiments.environment import capture
from experiments.shapes import PRESETS, resnet50_bn_shapes
from kernels import cuda_kernels, functional

DATA = Path(__file__).parent / "data"


def test_resnet50_shapes_are_derived_from_the_architecture():
    shapes = resnet50_bn_shapes(32)
    assert shapes[0] == (32, 64, 112, 112) and shapes[-1] == (32, 2048, 7, 7)
    assert len(shapes) == len(set(shapes)) == 12
    assert {(c, h) for _, c, h, _ in shapes} >= {(256, 56), (512, 28), (1024, 14), (2048, 7)}
    assert all(s in PRESETS["full"] for b in (1, 32, 256) for s in resnet50_bn_shapes(b))


def test_environment_capture_has_every_field():
    env = capture()
    assert set(env) <= set(sweep.COLUMNS) | {"max_sm_clock_mhz", "max_mem_clock_mhz"}
    assert env["torch"] and env["triton"] and env["commit"] and env["timestamp"]


def test_sweep_cli_rejects_bad_shapes():
    with pytest.raises(SystemExit):
        sweep.main(["--shapes", "2x3x4", "--out", "unused.csv"])


def test_sweep_writes_the_schema_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    argv = ["--device", "cpu", "--shapes", "2x8x7x7", "--backends", "triton", "torch", "--dtypes", "float32",
            "bfloat16", "--grid", "--out", str(out)]
    sweep.main(argv)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == sweep.COLUMNS
    assert {r["timing"] for r in rows} == {"cpu_wallclock"}  # marked: not a timing
    assert {r["backend"] for r in rows} == {"triton", "torch"}
    assert len({r["config"] for r in rows if r["backend"] == "triton"}) == 1 + len(sweep.TRITON_GRID)
    assert max(float(r["rel_error"]) for r in rows if r["dtype"] == "float32") < 1e-6
    sweep.main(argv)  # resumes: nothing left to do
    assert len(list(csv.DictReader(out.open()))) == len(rows)


def test_sweep_times_training_mode(tmp_path):
    out = tmp_path / "sweep.csv"
    sweep.main(["--device", "cpu", "--shapes", "2x8x5x5", "--backends", "triton", "torch", "cuda_naive",
                "--dtypes", "float32", "--modes", "eval", "train", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    train = [r for r in rows if r["mode"] == "train"]
    assert {r["backend"] for r in train} == {"triton", "torch"}  # the naive kernel is eval-only
    assert all(float(r["rel_error"]) < 1e-6 for r in rows)
    eval_bytes = {int(r["bytes"]) for r in rows if r["mode"] == "eval"}
    assert {int(r["bytes"]) for r in train} == {b + 2 * 8 * 25 * 4 for b in eval_bytes}  # x read a second time


def test_every_figure_from_the_fixture(tmp_path):
    plot.main(["--sweep", str(DATA / "sweep_fixture.csv"), "--grids", "--build", str(DATA / "build_cost_fixture.csv"),
               "--out", str(tmp_path)])
    made = {p.name for p in tmp_path.glob("*.png")}
    tuned = {row["backend"] for row in csv.DictReader((DATA / "sweep_fixture.csv").open()) if row["config"] != "default"}
    assert made == {"bandwidth.png", "roofline.png", "cuda_vs_triton.png", "speedup.png", "small_shape_latency.png",
                    "build_times.png", "training.png"} | {f"heatmap_{backend}.png" for backend in tuned}


def test_profile_runs_each_backend(capsys):
    profile.main(["--shape", "2x3x5x5", "--backends", "triton", "--mode", "train", "--device", DEVICE])
    assert "triton: 2 calls" in capsys.readouterr().out


def test_grid_runs_give_only_their_launch_configs():
    full = plot.load_sweep([DATA / "sweep_fixture.csv"])
    grid = plot.load_sweep([], [DATA / "sweep_fixture.csv"])
    assert len(grid) == (full.config != "default").sum() > 0
    assert (grid.config != "default").all()


def test_host_overhead_writes_one_row_per_call(tmp_path):
    out = tmp_path / "host.csv"
    host_overhead.main(["--device", DEVICE, "--backends", "triton", "--shape", "1x4x3x3", "--calls", "2",
                        "--repeats", "2", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["call"] for r in rows] == ["clone", "nn.Module(clone)", "empty_like", "F.batch_norm",
                                          "nn.BatchNorm2d", "BatchNorm2d", "batch_norm", "batch_norm(out=)", "launch"]
    assert float(rows[0]["ratio_to_clone"]) == 1.0 and all(float(r["us_per_call"]) > 0 for r in rows)


def test_host_overhead_python_only_takes_the_kernel_path(tmp_path):
    out = tmp_path / "host.csv"
    with mock.patch.object(functional, "_layout", wraps=functional._layout) as layout:
        host_overhead.main(["--device", "cpu", "--backends", "cuda", "--python-only", "--shape", "1x4x3x3",
                            "--calls", "2", "--repeats", "2", "--out", str(out)])
    assert layout.called  # only the kernels' path lays the input out
    assert len(list(csv.DictReader(out.open()))) == 9


def test_headline_table_from_the_fixture():
    table = plot.headline(plot.load_sweep([DATA / "sweep_fixture.csv"]))
    assert {"cuda", "triton", "torch", "torch_compile"} <= set(table.index)
    wins, points = table.loc["cuda", "faster than torch_compile"].split(",")[0].split(" / ")
    assert int(points) == 14 and 0 <= int(wins) <= 14  # the fixture's 14 points per backend
    training = plot.headline(plot.load_sweep([DATA / "sweep_fixture.csv"]), "train")
    assert {"cuda", "triton", "torch_compile"} <= set(training.index)


def test_kernelbench_files_are_current_and_pass_its_static_checker():
    for backend, path in kernelbench.FILES.items():
        code = kernelbench.GENERATORS[backend]()
        assert path.read_text() == code, f"{path} is stale: run python -m experiments.kernelbench generate"
        assert kernelbench.static_problems(code, backend) == []


def test_kernelbench_cuda_file_chooses_as_the_package():
    """The generated CUDA file's read_once, with the constants it carries, against the package's rule."""
    module = kernelbench.load(kernelbench.FILES["cuda"])
    for shape in [(32, 2048, 7, 7), (32, 64, 7, 7), (64, 64, 512, 512), (8, 3, 1, 1)]:
        for layout in ["nchw", "channels_last"]:
            x = torch.empty(shape, device="meta")
            assert module.read_once(x, layout) == cuda_kernels.read_once(x, layout), (shape, layout)


@pytest.mark.parametrize("code, problem", [
    ("try:\n    f()\nexcept Exception:\n    g()", "try/except"),
    ("class ModelNew(Model):\n    pass", "pass"),
    ("import threading", "threads"),
    ("y = F.batch_norm(x, m, v)", "torch batch_norm"),
    ("x = 1", "missing __global__"),
])
def test_static_checker_rejects(code, problem):
    assert problem in kernelbench.static_problems(code, "cuda")


def test_static_checker_ignores_comments():
    code = "__global__ void k() { threadIdx.x; }  // one pass\nload_inline  # pass"
    assert kernelbench.static_problems(code, "cuda") == []


@pytest.mark.parametrize("backend, kernel", [("cuda", "channel"), ("cuda", "grid"), ("triton", "")] if HAS_GPU
                         else [("triton", "")])
def test_kernelbench_model_matches_batchnorm2d(backend, kernel, monkeypatch):
    """ModelNew against nn.BatchNorm2d over training steps and in eval: outputs and every buffer. The CUDA
    file on a GPU with each of its one-kernel paths chosen for these small channels."""
    module = kernelbench.load(kernelbench.FILES[backend])
    if kernel == "grid":
        monkeypatch.setattr(module, "CHANNEL_BLOCK_BYTES", 0)
        monkeypatch.setattr(module, "GRID_MIN_CHANNEL_BYTES", 0)
    reference, ours = torch.nn.BatchNorm2d(8).to(DEVICE), module.ModelNew(8).to(DEVICE)
    with torch.no_grad():
        for training in (True, True, True, False):
            reference.train(training)
            ours.train(training)
            x = torch.rand(4, 8, 12, 12, device=DEVICE)
            torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, atol=1e-5, rtol=1e-5)
