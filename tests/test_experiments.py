"""The experiment pipeline without a GPU: shapes, the sweep's CSV (through the Triton interpreter, untimed),
the end-to-end models script, the committed results' files, and every figure from a small committed CSV."""
import csv
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import DEVICE, HAS_GPU

from experiments import host_overhead, kernelbench, models, plot, profile, sweep
from experiments.environment import RESULTS, append_csv, capture, gpu_tag
from experiments.shapes import PRESETS, resnet50_bn_shapes
from bn2d import dispatch, functional

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
    assert {r["variant"] for r in rows} == {"default"}
    assert {r["backend"] for r in rows} == {"triton", "torch"}
    assert len({r["config"] for r in rows if r["backend"] == "triton"}) == 1 + len(sweep.TRITON_GRID)
    assert max(float(r["rel_error"]) for r in rows if r["dtype"] == "float32") < 1e-6
    sweep.main(argv)  # resumes: nothing left to do
    assert len(list(csv.DictReader(out.open()))) == len(rows)


def test_sweep_times_training_modes(tmp_path):
    out = tmp_path / "sweep.csv"
    sweep.main(["--device", "cpu", "--shapes", "2x8x5x5", "--backends", "triton", "torch", "cuda_naive",
                "--dtypes", "float32", "--modes", "eval", "train", "train_backward", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    for mode in ["train", "train_backward"]:  # the naive kernel is eval-only
        assert {r["backend"] for r in rows if r["mode"] == mode} == {"triton", "torch"}, mode
    assert all(float(r["rel_error"]) < 1e-6 for r in rows)
    plane_bytes = 2 * 8 * 25 * 4  # one pass over x
    assert {r["mode"]: int(r["bytes"]) for r in rows} == {
        "eval": 2 * plane_bytes + 4 * 8 * 4,  # x read, y written; four per-channel vectors
        "train": 3 * plane_bytes + 4 * 8 * 4,  # x read a second time
        "train_backward": 8 * plane_bytes + 8 * 8 * 4}  # and x, dy read twice and dx written in the backward


def test_train_backward_error_is_the_worst_gradient():
    """rel_error of train_backward: the largest of dx's, dweight's and dbias's errors, so a wrong dbias shows."""
    x, params = sweep.make_inputs((2, 3, 4, 5), "float32", "channels_last", "cpu")
    dy = torch.randn_like(x)
    dx, dw, db = sweep.make_fn("torch", None, x, params, "train_backward", dy)()
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert sweep.rel_error("train_backward", (dx, dw, db), x, params, dy) < 1e-6
    assert sweep.rel_error("train_backward", (dx, dw, db + 1e-3 * db.norm()), x, params, dy) > 1e-4


def test_sweep_variants_are_rows_of_one_file(tmp_path):
    """An A/B: the variant's rows join the default's in one file; resuming skips only the variant's own."""
    out = tmp_path / "sweep.csv"
    argv = ["--device", "cpu", "--shapes", "2x8x5x5", "--backends", "torch", "--dtypes", "float32", "--layouts",
            "nchw", "--out", str(out)]
    sweep.main(argv)
    sweep.main(argv + ["--variant", "b"])
    sweep.main(argv + ["--variant", "b"])  # resumed: nothing left to do
    assert [r["variant"] for r in csv.DictReader(out.open())] == ["default", "b"]


def test_sweep_writes_to_the_family_file_of_its_modes(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "results_path", lambda family: tmp_path / f"{family}_cpu.csv")
    argv = ["--device", "cpu", "--shapes", "2x3x2x2", "--backends", "torch", "--dtypes", "float32", "--layouts",
            "nchw"]
    sweep.main(argv + ["--modes", "train", "train_backward"])
    sweep.main(argv + ["--grid"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid_cpu.csv", "train_cpu.csv"]
    with pytest.raises(SystemExit):  # eval and train rows belong to two files
        sweep.main(argv + ["--modes", "eval", "train"])


def test_models_writes_the_schema_and_resumes(tmp_path):
    """ResNet-18 at 48x48 (its last BatchNorms see 2x2 planes), batch 2, eval and a training step, eager and
    (eval only) folded: the CSV's columns, float64-checked results, and a resumed run that adds nothing."""
    pytest.importorskip("torchvision")
    out = tmp_path / "models.csv"
    argv = ["--device", "cpu", "--models", "resnet18", "--image", "48", "--batch", "2", "--backends", "torch",
            "torch_folded", "--dtypes", "float32", "--out", str(out)]
    models.main(argv)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == models.COLUMNS
    assert [(r["task"], r["dtype"], r["layout"], r["batch"], r["backend"]) for r in rows] == [
        ("eval", "float32", "nchw", "2", "torch"), ("eval", "float32", "nchw", "2", "torch_folded"),
        ("train", "float32", "nchw", "2", "torch")]
    assert all(float(r["rel_error"]) < 1e-4 for r in rows) and all(float(r["median_ms"]) > 0 for r in rows)
    models.main(argv)
    assert len(list(csv.DictReader(out.open()))) == len(rows)


def test_models_backends_table():
    assert {"torch", "cuda", "triton", "torch_compile", "torch_folded"} <= set(models.BACKENDS)
    assert models.BACKENDS["torch_folded"].tasks == ("eval",)
    assert {task for task, *_ in models.CONFIGS} == {"eval", "train"}


@pytest.mark.parametrize("name, tag", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA GeForce RTX 4090", "4090"),
                                       ("none", "cpu")])
def test_gpu_tag_in_file_names(name, tag):
    assert gpu_tag(name) == tag


def test_csv_writer_refuses_another_schema(tmp_path):
    out = tmp_path / "family.csv"
    append_csv(out, [dict(a=1, b=2, unused=3)], ["a", "b"])
    append_csv(out, [dict(a=4, b=5)], ["a", "b"])
    assert out.read_text() == "a,b\n1,2\n4,5\n"
    with pytest.raises(ValueError, match="columns"):
        append_csv(out, [dict(a=1, c=2)], ["a", "c"])


# The committed results: one long-format file per family and GPU, each with the schema its script writes.
FAMILY_COLUMNS = {"eval": sweep.COLUMNS, "train": sweep.COLUMNS, "grid": sweep.COLUMNS, "models": models.COLUMNS}
FAMILIES = set(FAMILY_COLUMNS) | {"build", "host", "kernelbench"}


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.csv")), ids=lambda p: p.name)
def test_committed_results_are_family_files(path):
    family, _, gpu = path.stem.rpartition("_")
    assert family in FAMILIES and re.fullmatch(r"[a-z]*\d+[a-z]*|cpu", gpu), path.name
    assert not re.search(r"[0-9a-f]{7}", path.stem), "a commit hash in a file name: the commit column holds it"
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    if family in FAMILY_COLUMNS:
        assert header == FAMILY_COLUMNS[family]
    else:  # the environment.write_csv families: the script's columns, the variant, the environment
        assert header[header.index("variant"):] == ["variant", *capture()]


def test_results_hold_only_family_files_a_log_and_the_archive():
    assert {p.suffix for p in RESULTS.iterdir() if p.is_file()} <= {".csv", ".log"}
    assert {p.name for p in RESULTS.iterdir() if p.is_dir()} <= {"archive", "gpu"}


def test_every_figure_from_the_fixture(tmp_path):
    plot.main(["--sweep", str(DATA / "sweep_fixture.csv"), "--grids", "--build", str(DATA / "build_cost_fixture.csv"),
               "--out", str(tmp_path)])
    made = {p.name for p in tmp_path.glob("*.png")}
    tuned = {row["backend"] for row in csv.DictReader((DATA / "sweep_fixture.csv").open()) if row["config"] != "default"}
    assert made == {"bandwidth.png", "roofline.png", "cuda_vs_triton.png", "speedup.png", "small_shape_latency.png",
                    "build_times.png", "training.png"} | {f"heatmap_{backend}.png" for backend in tuned}


def test_training_backward_figure(tmp_path):
    """The fwd+bwd figure, drawn from rows of that mode (the fixture's training rows, relabelled)."""
    df = plot.load_sweep([DATA / "sweep_fixture.csv"])
    plot.training(df.assign(mode=df["mode"].replace("train", "train_backward")), tmp_path, "train_backward")
    assert [p.name for p in tmp_path.iterdir()] == ["training_backward.png"]


def test_plots_read_one_variant(tmp_path):
    rows = list(csv.DictReader((DATA / "sweep_fixture.csv").open()))
    out = tmp_path / "ab.csv"
    append_csv(out, rows + [dict(row, variant="b", median_ms=1.0) for row in rows[:5]], list(rows[0]))
    assert len(plot.load_sweep([out])) == len(rows)
    variant = plot.load_sweep([out], variant="b")
    assert len(variant) == 5 and (variant.median_ms == 1.0).all()


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
    assert [(r["call"], r["backend"]) for r in rows] == [
        ("clone", "torch"), ("nn.Module(clone)", "torch"), ("empty_like", "torch"), ("F.batch_norm", "torch"),
        ("nn.BatchNorm2d", "torch"), ("train F.batch_norm", "torch"), *[(f"train {part}{floor}", "torch") for part in ("fwd+bwd", "fwd", "bwd")
                                       for floor in ("", " (empty Function)")],
        *[(f"train {part}", "triton") for part in ("fwd+bwd", "fwd", "bwd")], ("BatchNorm2d", "triton"),
        ("batch_norm", "triton"), ("batch_norm(out=)", "triton"), ("launch", "triton")]
    assert {r["variant"] for r in rows} == {"default"}
    assert float(rows[0]["ratio_to_clone"]) == 1.0 and all(float(r["us_per_call"]) > 0 for r in rows)


def test_host_overhead_python_only_takes_the_kernel_path(tmp_path):
    out = tmp_path / "host.csv"
    with mock.patch.object(functional, "_dense", wraps=functional._dense) as layout:
        host_overhead.main(["--device", "cpu", "--backends", "cuda", "--python-only", "--shape", "1x4x3x3",
                            "--calls", "2", "--repeats", "2", "--out", str(out)])
    assert layout.called  # only the kernels' path lays the input out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 19 and {r["variant"] for r in rows} == {"python_only"}


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
    """The generated CUDA file's training plan against the package's rule."""
    module = kernelbench.load(kernelbench.FILES["cuda"])
    for shape in [(32, 2048, 7, 7), (32, 64, 7, 7), (64, 64, 512, 512), (8, 3, 1, 1)]:
        for fmt in [torch.contiguous_format, torch.channels_last]:
            x = torch.empty(shape, device="meta").contiguous(memory_format=fmt)
            assert module.cuda_train(x) == dispatch.cuda_train(x), (shape, fmt)


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
