"""Every figure of the study, from the committed CSV only (no GPU needed).

    python -m experiments.plot                      # the committed results -> figures/
    python -m experiments.plot --sweep a.csv --build b.csv --out /tmp/figs
    python -m experiments.plot --variant x_on --out /tmp/figs   # another variant's rows of the same files
"""
import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.environment import RESULTS  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "figures"
# The runs the figures and the README come from, as the default variant of each family: the eval full sweep,
# the training sweep, and the launch-config grid for the heatmaps (other variants are the notes' A/B rows).
CURRENT = [RESULTS / "eval_h100.csv", RESULTS / "train_h100.csv"]
GRIDS = [RESULTS / "grid_h100.csv"]
BUILD = RESULTS / "build_h100.csv"
# Training modes: figure, title, the tensor passes of the byte model (experiments.sweep.mode_bytes; the roofline
# is those passes at the copy's speed), and the passes left where a kernel keeps x (and dy) on chip.
TRAINING = {"train": ("training.png", "Training forward", 3, 2),
            "train_backward": ("training_backward.png", "Training forward and backward (autograd)", 8, 5)}
OURS = ["cuda", "triton"]
BASELINES = ["torch", "torch_compile"]
COLORS = {"cuda": "C0", "cuda_naive": "C7", "triton": "C1", "torch": "C2", "torch_nocudnn": "C4",
          "torch_compile": "C3", "copy": "black"}
# Datasheet float32 (non-tensor-core) peak, TFLOP/s, for the roofline's compute roof.
FP32_TFLOPS = [("A100", 19.5), ("H100 PCIe", 51.2), ("H100", 66.9), ("H200", 66.9)]


def load_sweep(paths, grids=(), variant="default") -> pd.DataFrame:
    """The rows of `variant` in the sweeps in `paths`, and the launch configs of the grid runs in `grids`
    (their default-config rows are left out: the sweep measures those, and a grid run from another commit
    would mix into its medians)."""
    frames = [pd.read_csv(p) for p in paths] + [g[g.config != "default"] for g in map(pd.read_csv, grids)]
    df = pd.concat(frames, ignore_index=True)
    df = df[df.variant == variant].reset_index(drop=True)
    df["shape"] = df.n.astype(str) + "x" + df.c.astype(str) + "x" + df.h.astype(str) + "x" + df.w.astype(str)
    df["numel"] = df.n * df.c * df.h * df.w
    return df


def defaults(df, timing="do_bench", mode="eval"):
    """One row per (shape, dtype, layout, backend): the median over repeats of the default config."""
    d = df[(df.config == "default") & (df.timing == timing) & (df["mode"] == mode)]
    keys = ["shape", "numel", "dtype", "layout", "backend"]
    return d.groupby(keys, as_index=False)[["median_ms", "p20_ms", "p80_ms", "copy_ms", "bytes", "gbps", "copy_gbps",
                                            "pct_of_copy", "datasheet_gbps"]].median()


def device_times(df, mode="eval"):
    """defaults() by CUDA-graph replay where a shape has it (tensors up to 64 MB), else by do_bench: the
    device's time, without the host's launch path that do_bench measures on small tensors."""
    graph = defaults(df, "cudagraph", mode)
    bench = defaults(df, "do_bench", mode)
    keys = ["shape", "dtype", "layout", "backend"]
    timed = bench.set_index(keys).index.isin(graph.set_index(keys).index)
    return pd.concat([graph, bench[~timed]], ignore_index=True)


def headline(df, mode="eval") -> pd.DataFrame:
    """The README's results tables: per backend, min / median % of the roofline (eval: the copy; training: its
    passes at the copy's speed) for tensors over 200 MB (do_bench), all points (do_bench), tensors up to 64 MB
    (CUDA graph); points at >= 95% (device times); and, per point by device time, how often it beats PyTorch
    eager, torch.compile and the other kernel backend."""
    bench, graph, device = defaults(df, mode=mode), defaults(df, "cudagraph", mode), device_times(df, mode)
    times = device.pivot_table(index=["shape", "dtype", "layout"], columns="backend", values="median_ms")
    rivals = {"cuda": "triton", "triton": "cuda"}

    def span(values):
        return f"{values.min():.0f} / {values.median():.0f}" if len(values) else ""

    rows = {}
    for backend, d in device.groupby("backend"):
        row = {"> 200 MB, do_bench": span(bench[(bench.backend == backend) & (bench.bytes > 200e6)].pct_of_copy),
               "all, do_bench": span(bench[bench.backend == backend].pct_of_copy),
               "<= 64 MB, CUDA graph": span(graph[graph.backend == backend].pct_of_copy),
               ">= 95%": f"{(d.pct_of_copy >= 95).sum()} / {len(d)}"}
        for other in ["torch", "torch_compile", rivals.get(backend)]:
            if backend in OURS and other in times:
                ratio = (times[other] / times[backend]).dropna()
                row[f"faster than {other}"] = f"{(ratio > 1).sum()} / {len(ratio)}, median {ratio.median():.2f}x"
        rows[backend] = row
    return pd.DataFrame.from_dict(rows, orient="index").fillna("")


def panels(df, title):
    """A dtype x layout grid of axes."""
    dtypes, layouts = sorted(df.dtype.unique()), sorted(df.layout.unique())
    fig, axes = plt.subplots(len(dtypes), len(layouts), figsize=(6 * len(layouts), 3.6 * len(dtypes)),
                             squeeze=False, sharex=True)
    fig.suptitle(title)
    for i, dtype in enumerate(dtypes):
        for j, layout in enumerate(layouts):
            yield axes[i, j], dtype, layout, df[(df.dtype == dtype) & (df.layout == layout)]
    fig.tight_layout()


def bandwidth(df, out):
    d = defaults(df)
    gen = panels(d, "Achieved bandwidth vs bytes moved (do_bench, L2 flushed; bars: p20-p80 of the timings)")
    for ax, dtype, layout, part in gen:
        for backend, g in part.groupby("backend"):
            g = g.sort_values("bytes")
            low, high = g.bytes / g.p80_ms / 1e6, g.bytes / g.p20_ms / 1e6
            yerr = [(g.gbps - low).clip(lower=0), (high - g.gbps).clip(lower=0)]  # medians of runs may cross
            ax.errorbar(g.bytes, g.gbps, yerr=yerr, fmt="o-", ms=3, lw=1, capsize=2,
                        label=backend, color=COLORS.get(backend))
        copy_line(ax, part, part.copy_gbps)
        ax.axhline(part.datasheet_gbps.max(), color="grey", ls=":", label="datasheet")
        ax.set(xscale="log", title=f"{dtype}, {layout}", xlabel="bytes moved", ylabel="GB/s")
    ax.legend(fontsize=7)
    save(out, "bandwidth.png")


def copy_line(ax, part, values):
    """The copy of the same bytes, once per shape, as a dashed line over bytes moved."""
    copy = part.assign(value=values).drop_duplicates("shape").sort_values("bytes")
    ax.plot(copy.bytes, copy.value, "k--", lw=1.5, label="copy (same bytes)")


def roofline(df, out):
    d = defaults(df)
    gpu = df.gpu_name.iloc[0]
    peak_flops = next((t for k, t in FP32_TFLOPS if k in gpu), np.nan) * 1e12
    d["flops"] = 2.0 * d.numel  # one multiply-add per element
    d["intensity"] = d.flops / d.bytes
    d["achieved"] = d.flops / (d.median_ms * 1e-3)
    fig, ax = plt.subplots(figsize=(7, 5))
    ai = np.logspace(-2, 3, 200)
    copy_bw = d.copy_gbps.max() * 1e9
    ax.plot(ai, np.minimum(ai * copy_bw, peak_flops), "k-", label=f"roof: best copy {copy_bw / 1e9:.0f} GB/s, "
                                                                   f"fp32 {peak_flops / 1e12:.0f} TFLOP/s")
    ax.plot(ai, np.minimum(ai * d.datasheet_gbps.max() * 1e9, peak_flops), "k:", label="roof: datasheet bandwidth")
    for backend, g in d.groupby("backend"):
        ax.scatter(g.intensity, g.achieved, s=10, alpha=0.6, label=backend, color=COLORS.get(backend))
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="FLOP/s",
           title=f"Roofline, eval BatchNorm2d on {gpu}")
    ax.legend(fontsize=7)
    save(out, "roofline.png")


def heatmaps(df, out):
    grid = df[(df.config != "default") & (df.timing == "do_bench") & (df["mode"] == "eval")]
    for backend, g in grid.groupby("backend"):
        g = g.assign(point=g["shape"] + " " + g.dtype + " " + g.layout)
        table = g.pivot_table(index="config", columns="point", values="pct_of_copy", aggfunc="median")
        table = table.loc[sorted(table.index, key=natural_key)]
        fig, ax = plt.subplots(figsize=(1 + 0.45 * table.shape[1], 1.5 + 0.3 * table.shape[0]))
        im = ax.imshow(table.values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=90, fontsize=7)
        ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
        for (i, j), v in np.ndenumerate(table.values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < 60 else "k")
        fig.colorbar(im, ax=ax, label="% of copy")
        ax.set_title(f"{backend}: launch configs, % of copy bandwidth")
        save(out, f"heatmap_{backend}.png")


def natural_key(text: str):
    """Sort key that orders the numbers inside a string by value (block_r=2 before block_r=16)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def ratios(df, out, name, numerators, denominators, title):
    """Bars of time(denominator) / time(numerator) per shape (device times): > 1 means the numerator is
    faster; a log scale, so that 2x faster and 2x slower look alike."""
    d = device_times(df)
    t = d.pivot_table(index=["shape", "numel", "dtype", "layout"], columns="backend", values="median_ms").reset_index()
    t = t.sort_values("numel")
    gen = panels(t, title)
    for ax, dtype, layout, part in gen:
        x = np.arange(len(part))
        pairs = [(a, b) for a in numerators for b in denominators if a in part and b in part]
        for k, (a, b) in enumerate(pairs):
            ratio = part[b] / part[a]  # drawn from 1, up when faster, down when slower
            ax.bar(x + k / (len(pairs) + 1), ratio - 1, bottom=1, width=1 / (len(pairs) + 1), label=f"{b} / {a}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(x, part["shape"], rotation=90, fontsize=6)
        ax.set(title=f"{dtype}, {layout}", ylabel="time ratio", yscale="log")
    ax.legend(fontsize=7)
    save(out, name)


def training(df, out, mode="train"):
    """A training mode: % of its roofline (the byte model's passes at the copy's bandwidth; training forward:
    x read twice, y written once) vs bytes; a kernel that reads x once from memory can exceed 100%."""
    d = device_times(df, mode)
    if d.empty:
        return
    name, title, passes, on_chip = TRAINING[mode]
    for ax, dtype, layout, part in panels(d, f"{title}: % of the {passes}-pass roofline (device times)"):
        for backend, g in part.groupby("backend"):
            g = g.sort_values("bytes")
            ax.plot(g.bytes, g.pct_of_copy, "o-", ms=3, color=COLORS.get(backend), label=backend)
        ax.axhline(100, color="black", ls="--", lw=1, label=f"{passes} passes at copy speed")
        ax.axhline(100 * passes / on_chip, color="gray", ls=":", lw=1, label=f"{on_chip} passes at copy speed")
        ax.set(xscale="log", title=f"{dtype}, {layout}", xlabel=f"bytes moved ({passes} passes)",
               ylabel=f"% of {passes}-pass roofline")
    ax.legend(fontsize=7)
    save(out, name)


def small_shape_latency(df, out):
    d = defaults(df, timing="cudagraph")
    gen = panels(d, "Device time per call by CUDA-graph replay (small shapes)")
    for ax, dtype, layout, part in gen:
        for backend, g in part.groupby("backend"):
            g = g.sort_values("bytes")
            ax.plot(g.bytes, g.median_ms * 1e3, "o-", ms=3, lw=1, label=backend, color=COLORS.get(backend))
        copy_line(ax, part, part.copy_ms * 1e3)
        ax.set(xscale="log", yscale="log", title=f"{dtype}, {layout}", xlabel="bytes moved", ylabel="µs")
    ax.legend(fontsize=7)
    save(out, "small_shape_latency.png")


def build_times(path, out, variant="default"):
    """The last run of `variant` in a build family file."""
    df = pd.read_csv(path)
    df = df[df.variant == variant]
    df = df[df.timestamp == df.timestamp.max()]
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = df.backend + ": " + df.step
    ax.barh(labels, df.seconds, color=[COLORS[b] for b in df.backend])
    for y, s in enumerate(df.seconds):
        ax.text(s, y, f" {s:.2f} s", va="center", fontsize=8)
    ax.set(xscale="log", xlabel="seconds", title=f"Build and JIT cost ({df.gpu_name.iloc[0]}, {df.cpu_count.iloc[0]} CPUs)")
    save(out, "build_times.png")


def save(out: Path, name: str):
    plt.savefig(out / name, dpi=120, bbox_inches="tight")
    plt.close("all")
    print(out / name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", nargs="+", type=Path, default=CURRENT)
    parser.add_argument("--grids", nargs="*", type=Path, default=GRIDS, help="launch-config grid runs")
    parser.add_argument("--build", type=Path, default=BUILD)
    parser.add_argument("--variant", default="default", help="the variant whose rows are drawn")
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    df = load_sweep(args.sweep, args.grids, args.variant)
    bandwidth(df, args.out)
    roofline(df, args.out)
    heatmaps(df, args.out)
    ratios(df, args.out, "cuda_vs_triton.png", ["cuda"], ["triton"],
           "Triton time / CUDA time (> 1: CUDA faster; CUDA graph up to 64 MB, do_bench above)")
    ratios(df, args.out, "speedup.png", OURS, BASELINES,
           "Speed-up over PyTorch eager and torch.compile (CUDA graph up to 64 MB, do_bench above)")
    small_shape_latency(df, args.out)
    for mode in TRAINING:
        training(df, args.out, mode)
    build_times(args.build, args.out, args.variant)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        for mode in sorted(df["mode"].unique()):
            roof = f"{TRAINING[mode][2]}-pass roofline" if mode in TRAINING else "copy"
            print(f"{mode}: % of the {roof}, min / median")
            print(headline(df, mode))


if __name__ == "__main__":
    main()
