"""Which kernel runs, with which launch parameters: one rule per backend and operation, made here, in Python,
once per call, and returned as a `Plan` that the backend launches as told (`explain` shows it). Each
threshold is named once, with its reason and the measurements behind it (experiments/NOTES.md and the
results files it cites; H100 measurements unless a comment says otherwise).

Operations: ``eval`` (normalise with given statistics), ``train`` (batch statistics, running statistics and
the normalisation), ``backward`` (the training backward, and frozen BatchNorm's).
"""
from typing import NamedTuple, Tuple

import torch
import triton


class Plan(NamedTuple):
    """What a backend runs for one operation."""

    backend: str
    op: str  # "eval", "train" or "backward"
    layout: str  # the memory the kernels read: "nchw", "channels_last" (also NCHW with 1x1 planes) or "naive"
    kernels: Tuple[str, ...]  # the kernels, in launch order
    launch: dict  # launch parameters
    why: str
    code: int = 0  # the CUDA eval plan packed for the bound call (cuda_bindings.py, `unpack`)


class CudaConfig(NamedTuple):
    """Launch parameters of the CUDA kernels (the naive kernel has fixed ones); a plan's defaults where 0/-1."""

    threads: int = 0  # threads per block, a multiple of 32 (channels_last's tiled kernel: at most 512); 0: the
                      # kernel's (256; small channels_last: 128)
    vectorized: bool = True  # 16-byte loads and stores where the pointers and sizes allow
    blocks_per_sm: int = 0  # 0: enough blocks to cover the tensor once; k: a grid-stride grid of k per SM
    fused: int = -1  # training: -1 one kernel reading x once where it pays, 0 never, 1 wherever one applies
    small: int = -1  # normalisation: the small-tensor kernels, -1 by size, 0 never, 1 wherever they apply


class TritonConfig(NamedTuple):
    """Tile shape and warps of the Triton kernels; 0 fields take the heuristic default. The flat kernel takes
    block_r * block_l elements per program."""

    block_r: int = 0  # rows per program (a power of two)
    block_l: int = 0  # columns per program (a power of two)
    num_warps: int = 0


def layout_of(x) -> str:
    """The kernels' name for x's memory: contiguous NCHW is "nchw" unless its planes are single elements (then
    it is NHWC memory too, which the channels_last kernels read best); else "channels_last"."""
    return "nchw" if x.is_contiguous() and x.size(2) * x.size(3) > 1 else "channels_last"


def _aligned(t, bytes_: int) -> bool:
    return t is None or t.data_ptr() % bytes_ == 0


# ---------------------------------------------------------------------------------------------------------------
# CUDA, eval: the NCHW kernels read the tensor as a flat array; the channels_last kernels as rows of channels.
VEC_BYTES = 16  # the widest access, cuda_header.py's VEC_BYTES
UNROLL = 4  # vectors in flight per thread, cuda_header.py's UNROLL
DEFAULT_THREADS = 256
# Tensors of at most SMALL_BYTES take a small-tensor kernel (a vector a thread: no table, no barrier, no loop):
# latency-bound sizes, where the tiled kernels' table and loop cost more than they save (NOTES "Small tensors,
# a kernel of their own", "Tensors of 4-32 MB"). NCHW ones of single elements or of 16-bit vectors that
# straddle planes only up to SMALL_NARROW_BYTES (two pairs per eight elements cost more than the table above it).
SMALL_BYTES = 16 << 20
SMALL_NARROW_BYTES = 2 << 20
# channels_last's small kernel: blocks of 128 threads, each four rows of a 16-byte vector (single elements: one
# row); 16-bit tensors of at most SMALL_NARROW_BYTES, two rows of an 8-byte vector, since a warp there is
# latency-bound and half the channels per thread issue fewer instructions (NOTES "channels_last small
# tensors", "16-bit channels_last tensors of at most 2 MB: narrower threads").
SMALL_CHANNELS_LAST_THREADS = 128
SMALL_CHANNELS_LAST_ROWS = 4
# channels_last_kernel's __launch_bounds__ (cuda_header.py): its bfloat16 build spilled at 1024 threads; the flat
# kernel's float16 build at 1024 (a pair per element: four parameter addresses each).
CHANNELS_LAST_MAX_THREADS = 512
FLAT_MAX_THREADS = 256
# The flat kernel (a 16-byte vector a thread, a pair per element) for what no vector fits: channels_last rows of
# channels not a whole number of vectors (single channels read 36% of copy on an RGB batch, 0.59x torch.compile:
# H200, issue "the house"); NCHW tensors of at most FLAT_BYTES whose vectors straddle planes, where a pair per
# element beat the straddling small kernel's two per vector (H200, eval_h200.csv at 659d341, CUDA graphs: the
# naive kernel, a pair per element, 1.6-2.0 us against 2.2-3.1 us from 107 to 520 KB; the straddling kernel
# ahead from 1.6 MB, 3.3 us against 5.3). 16-bit tensors of at most SMALL_NARROW_BYTES take 8-byte vectors: 16
# bytes held eight pairs a thread (1,800 SASS instructions against float32's 717), 0.66-0.75x torch.compile's
# speed on tiny 16-bit tensors (eval_h200.csv at ab061d2).
FLAT_BYTES = 512 << 10
_EVAL_KERNELS = {"nchw_kernel": 0, "small_kernel": 1, "channels_last_kernel": 2, "small_channels_last_kernel": 3,
                 "naive_kernel": 4, "flat_kernel": 5}


def _pack(kernel: str, vec: int, whole: bool = True, long_planes: bool = False, rows: int = 0,
          threads: int = 256) -> int:
    return _EVAL_KERNELS[kernel] | vec << 4 | whole << 9 | long_planes << 10 | rows << 11 | threads << 15


def _small(config: CudaConfig, x, limit: int) -> bool:
    """A small-tensor kernel (32-bit indices) for tensors of at most `limit` bytes, or as the config asks."""
    if config.small == 0 or x.numel() >= 2 ** 31:
        return False
    return config.small == 1 or (config.blocks_per_sm == 0 and x.numel() * x.element_size() <= limit)


def _eval_plan(kernel, layout, why, vec, **launch) -> Plan:
    return Plan("cuda", "eval", layout, (kernel,), dict(vec=vec, **launch), why, _pack(kernel, vec, **launch))


def cuda_eval(x, weight, bias, mean, var, y=None, config: CudaConfig = CudaConfig(), pointers: bool = True) -> Plan:
    """The CUDA eval plan for x (and y, the output: None for a fresh, aligned one). pointers=False plans for
    aligned pointers whatever these tensors' are: the plan a cache keeps for every tensor of x's shape (the
    bound call checks each tensor's alignment, and a misaligned one takes the general path)."""
    elem, numel = x.element_size(), x.numel()
    full = VEC_BYTES // elem
    layout = layout_of(x)
    aligned = config.vectorized and (not pointers or (_aligned(x, VEC_BYTES) and _aligned(y, VEC_BYTES)))
    if layout == "nchw":
        plane = x.size(2) * x.size(3)
        # The widest vector a plane is a whole number of (16 bytes, else 8: 14x14 planes of a 16-bit type);
        # vectors that straddle planes only where a plane is neither (7x7).
        if not aligned:
            vec, whole, why = 1, True, "single elements: x or y not 16-byte aligned (or vectorized=False)"
        elif plane % full == 0:
            vec, whole, why = full, True, "16-byte vectors: planes a whole number of them"
        elif full > 2 and plane % (full // 2) == 0:
            vec, whole, why = full // 2, True, "8-byte vectors: planes a whole number of them, not of 16 bytes"
        else:
            vec, whole, why = full, False, "16-byte vectors that straddle planes"
        if not whole and _small(config, x, FLAT_BYTES):
            return _flat_plan(x, layout, f"{why}; small tensor", config)
        narrow = vec == 1 or (not whole and elem == 2)
        threads = config.threads or DEFAULT_THREADS
        if (whole or plane >= vec) and _small(config, x, SMALL_NARROW_BYTES if narrow else SMALL_BYTES):
            return _eval_plan("small_kernel", layout, f"{why}; small tensor: a vector a thread", vec,
                              whole=whole, threads=threads)
        long_planes = plane >= threads * UNROLL * vec
        return _eval_plan("nchw_kernel", layout, f"{why}; tiles " + ("within two planes, no table" if long_planes
                                                                     else "with a table of their planes"),
                          vec, whole=whole, long_planes=long_planes, threads=threads)
    if aligned and x.size(1) % full and numel < 2 ** 31 and config.blocks_per_sm == 0:
        return _flat_plan(x, layout, "rows of channels not a whole number of 16-byte vectors", config)
    vec = full if aligned and x.size(1) % full == 0 else 1
    why = "16-byte vectors of channels" if vec > 1 else "single channels: rows not a whole number of 16 bytes"
    params = not pointers or all(_aligned(t, vec * t.element_size()) for t in (weight, bias, mean, var) if t is not None)
    if params and _small(config, x, SMALL_BYTES):
        threads = config.threads or SMALL_CHANNELS_LAST_THREADS
        if elem == 2 and vec > 1 and numel * elem <= SMALL_NARROW_BYTES:
            return _eval_plan("small_channels_last_kernel", layout, f"{why}; small 16-bit tensor: two rows of "
                              "half a vector a thread", vec // 2, rows=2, threads=threads)
        return _eval_plan("small_channels_last_kernel", layout, f"{why}; small tensor: rows of a vector a thread",
                          vec, rows=SMALL_CHANNELS_LAST_ROWS if vec > 1 else 1, threads=threads)
    threads = min(config.threads or DEFAULT_THREADS, CHANNELS_LAST_MAX_THREADS)
    return _eval_plan("channels_last_kernel", layout, f"{why}; blocks own channel ranges and walk the rows", vec,
                      threads=threads)


def _flat_plan(x, layout, why, config) -> Plan:
    vec = VEC_BYTES // x.element_size()
    if x.element_size() == 2 and x.numel() * 2 <= SMALL_NARROW_BYTES:
        vec, why = vec // 2, f"{why}; small 16-bit tensor: 8-byte vectors"
    return _eval_plan("flat_kernel", layout, f"{why}: a vector a thread, a pair per element", vec,
                      threads=min(config.threads or DEFAULT_THREADS, FLAT_MAX_THREADS))


def cuda_naive(x) -> Plan:
    if not x.is_contiguous():
        raise ValueError("the cuda_naive backend reads contiguous NCHW input only")
    return _eval_plan("naive_kernel", "naive", "the starting point: one thread per element", 1)


# CUDA, training: one kernel that reads x once where it pays, else three kernels (statistics, their finalize, an
# eval kernel). A block per channel (NCHW) or per GROUP_BYTES of each row (channels_last) holds its channel or
# group in shared memory when it fits (NOTES "Training"); the persistent grid keeps large float32 NCHW channels
# on chip across one grid barrier (a few microseconds, so only for channels of GRID_MIN_CHANNEL_BYTES or more).
CHANNEL_BLOCK_BYTES = 112 << 10
GROUP_BYTES = 32  # of each channels_last row: cuda_training.py's GROUP_BYTES
GROUP_MIN_BLOCKS = 64  # fewer channel groups than this ran slower than three kernels (4-32 of them)
GRID_MIN_CHANNEL_BYTES = 32 << 20


def cuda_train(x, y=None, config: CudaConfig = CudaConfig(), save: bool = False) -> Plan:
    """The CUDA training-forward plan for x laid out as layout_of(x) (y: the output, None for a fresh one);
    `save`: one that gives the batch statistics (for the backward), which the persistent grid does not."""
    n, c, h, w = x.shape
    layout, channel_bytes = layout_of(x), n * h * w * x.element_size()
    if config.fused != 0 and layout == "channels_last":
        row_bytes = c * x.element_size()
        if (n * h * w * min(row_bytes, GROUP_BYTES) <= CHANNEL_BLOCK_BYTES
                and -(-row_bytes // GROUP_BYTES) >= GROUP_MIN_BLOCKS):
            return cuda_train_plan(x, y, "channel_group_kernel",
                                   f"a block per {GROUP_BYTES} bytes of channels holds them on chip: x read once")
    elif config.fused != 0:
        if channel_bytes <= CHANNEL_BLOCK_BYTES:
            return cuda_train_plan(x, y, "channel_kernel", "a block per channel holds it in shared memory: x read once")
        grid = x.dtype == torch.float32 and n * h * w < 2 ** 33 and cuda_vec(x, y, 4) == 4
        if grid and not save and (config.fused == 1 or channel_bytes >= GRID_MIN_CHANNEL_BYTES):
            return cuda_train_plan(x, y, "fused_nchw_kernel",
                                   "a persistent grid keeps each channel on chip across a grid barrier: x read once")
    return cuda_train_plan(x, None, "channels_last_stats_kernel" if layout == "channels_last" else "nchw_stats_kernel",
                           "statistics, then the normalisation (an eval plan): x read twice")


def cuda_vec(x, y, vec: int) -> int:
    """`vec` if vectors of that many elements fit x (and y): aligned, and whole planes (NCHW) or rows of
    channels (channels_last); else 1."""
    n, c, h, w = x.shape
    bytes_ = vec * x.element_size()
    fits = (c if layout_of(x) == "channels_last" else h * w) % vec == 0
    return vec if fits and _aligned(x, bytes_) and _aligned(y, bytes_) else 1


def cuda_train_plan(x, y, kernel: str, why: str = "as asked") -> Plan:
    """A training plan for `kernel` with the widest vectors it takes that fit x and y: 16 bytes (the block per
    channel of NCHW planes: else 8), else single elements; the persistent grid takes 16-byte float32 vectors
    only. (On 1x1 planes, channels_last memory, the block per channel runs as the block per channel group.)"""
    full = VEC_BYTES // x.element_size()
    if kernel == "channel_kernel" and layout_of(x) == "nchw":
        vec = max(cuda_vec(x, y, full), cuda_vec(x, y, max(full // 2, 1)))
    else:
        vec = cuda_vec(x, y, full)
    kernels = (kernel, "finalize_stats_kernel") if kernel.endswith("stats_kernel") else (kernel,)
    return Plan("cuda", "train", layout_of(x), kernels, dict(vec=vec), why)


# ---------------------------------------------------------------------------------------------------------------
# Triton, eval. The flat kernel reads the tensor as one array and gathers each element's scale and shift by its
# channel; the tile kernel normalises [BLOCK_R, BLOCK_L] tiles of rows (NCHW planes, or channels_last pixels)
# with a pair per row or column. Measured on every eval point of the full sweep (NOTES "Triton: the flat
# kernel almost everywhere"): the tile kernel is faster only on 16-bit tensors over FLAT_ELEMENTS, where its
# pair per row or column spares the flat kernel's four gathered parameters per element -- unless NCHW planes
# are not a whole number of 16 elements: such rows start at odd alignments, and the tile kernel loses its wide
# accesses.
FLAT_ELEMENTS = 1 << 19
# A flat program: FLAT_WARPS warps over FLAT_BLOCK elements, one 16-byte vector of float32 per thread (twice
# the elements, a 16-byte vector of theirs, for 16-bit tensors over FLAT_ELEMENTS).
FLAT_BLOCK = 512
FLAT_WARPS = 4
# Elements per tile: large enough that a program moves tens of kilobytes. NCHW tensors of at most
# SMALL_ELEMENTS take a quarter of that, or their grids leave most SMs idle (1x64x112x112 in tiles of 8192: 98
# programs; NOTES "Small tensors, a kernel of their own"). channels_last keeps the large tile: its programs
# compute a pair per column, and a tile of fewer rows computes more per element.
TILE_ELEMENTS = 8192
SMALL_ELEMENTS = 1 << 22
MAX_BLOCK_L = 4096
# tl.gather (Triton 3.2 and later) lets a flat program compute scale and shift once per plane it touches.
HAS_GATHER = hasattr(triton.language, "gather")


def tile_config(rows: int, cols: int, tile: int = TILE_ELEMENTS) -> TritonConfig:
    """A tile of about `tile` elements: as wide as a row allows, then as many rows as fill it."""
    block_l = min(triton.next_power_of_2(max(cols, 1)), MAX_BLOCK_L, tile)
    block_r = min(max(tile // block_l, 1), triton.next_power_of_2(max(rows, 1)))
    return TritonConfig(block_r, block_l, 8 if block_r * block_l >= 8192 else 4)


def triton_eval(x, config: TritonConfig = TritonConfig()) -> Plan:
    """The Triton eval plan for x."""
    n, c, h, w = x.shape
    numel, layout = x.numel(), layout_of(x)
    large_16bit = x.element_size() == 2 and numel > FLAT_ELEMENTS
    odd_planes = layout == "nchw" and h * w % 16 != 0
    if not large_16bit or odd_planes:
        block = max(config.block_r, 1) * config.block_l or FLAT_BLOCK * (2 if large_16bit else 1)
        # Per plane for NCHW tensors over FLAT_ELEMENTS with planes of more than one element (7x7 in 16-bit
        # types 0.54-0.81x the time, float32 0.77x; NOTES "Triton's flat kernel: scale and shift per plane");
        # smaller tensors measured 3-6% slower that way.
        per_plane = HAS_GATHER and layout == "nchw" and numel > FLAT_ELEMENTS
        planes = triton.next_power_of_2(block // (h * w) + 2) if per_plane else 0
        why = ("16-bit NCHW planes not a whole number of 16 elements" if large_16bit else
               "not a 16-bit tensor over FLAT_ELEMENTS") + ("; scale and shift per plane" if planes else "")
        return Plan("triton", "eval", layout, ("normalize_flat_kernel",),
                    dict(BLOCK=block, PLANES=planes, WIDE=numel + block >= 2 ** 31,
                         num_warps=config.num_warps or FLAT_WARPS), f"flat: {why}")
    rows, cols = (n * c, h * w) if layout == "nchw" else (n * h * w, c)
    tile = TILE_ELEMENTS // 4 if layout == "nchw" and numel <= SMALL_ELEMENTS else TILE_ELEMENTS
    block_r, block_l, num_warps = (given or default for given, default in zip(config, tile_config(rows, cols, tile)))
    return Plan("triton", "eval", layout, ("normalize_kernel",),
                dict(BLOCK_R=block_r, BLOCK_L=block_l, num_warps=num_warps, rows=rows, cols=cols,
                     ROW_LEN=cols if cols % 16 and cols <= MAX_BLOCK_L else 0),
                "tiles: a 16-bit tensor over FLAT_ELEMENTS, a pair per row or column")


# Triton, training: one program per channel (NCHW) or per GROUP_CHANNELS channels (channels_last) where that
# fits in one tile of CHANNEL_TILE_ELEMENTS -- x read once, one launch; else statistics, their finalize and an
# eval plan. Triton has no counterpart of the persistent grid: its programs cannot wait for each other.
CHANNEL_TILE_ELEMENTS = 16384
GROUP_CHANNELS = 8


def triton_train(x, fused: bool = True) -> Plan:
    """The Triton training-forward plan for x (its read-once kernels also give the batch statistics, for the
    backward); fused=False: the three-kernel one."""
    n, c, h, w = x.shape
    layout = layout_of(x)
    tile = triton.next_power_of_2(n) * triton.next_power_of_2(h * w) if layout == "nchw" else (
        triton.next_power_of_2(n * h * w) * min(triton.next_power_of_2(c), GROUP_CHANNELS))
    if fused and tile <= CHANNEL_TILE_ELEMENTS:
        if layout == "nchw":
            return triton_train_plan(x, "channel_kernel", "a program per channel holds it in one tile: x read once")
        return triton_train_plan(x, "channel_group_kernel",
                                 f"a program per {GROUP_CHANNELS} channels holds them in one tile: x read once")
    return Plan("triton", "train", layout, ("stats_kernel", "finalize_kernel"), {},
                "statistics, then the normalisation (an eval plan): x read twice")


def triton_train_plan(x, kernel: str, why: str = "as asked") -> Plan:
    """A read-once training plan for `kernel`: the whole channel (or group of channels) in one tile."""
    n, c, h, w = x.shape
    if kernel == "channel_kernel":
        launch = dict(BLOCK_N=triton.next_power_of_2(n), BLOCK_L=triton.next_power_of_2(h * w))
    else:
        launch = dict(BLOCK_R=triton.next_power_of_2(n * h * w), BLOCK_C=min(triton.next_power_of_2(c), GROUP_CHANNELS))
    a, b = launch.values()
    return Plan("triton", "train", layout_of(x), (kernel,), dict(launch, num_warps=8 if a * b >= 4096 else 4), why)


# ---------------------------------------------------------------------------------------------------------------
# Backward, both backends: one kernel reads dy and x once where a block (CUDA) or a program (Triton) holds a
# channel of both (NCHW) or a group of channels of every row (channels_last); else three kernels: partial sums
# per piece of each channel, their finalize (dweight, dbias and dx's coefficients), and dx elementwise. The
# forward's bounds, for two tensors instead of one (CUDA: the forward's CHANNEL_BLOCK_BYTES of shared memory for
# dy and x together).
BACKWARD_BLOCK_BYTES = CHANNEL_BLOCK_BYTES


def cuda_backward(x, fused: bool = True) -> Plan:
    """The CUDA backward plan for x laid out as layout_of(x); fused=False: the three-kernel one."""
    n, c, h, w = x.shape
    rows, layout = n * h * w, layout_of(x)
    groups = -(-c * x.element_size() // GROUP_BYTES)
    if fused and layout == "channels_last" and 2 * rows * GROUP_BYTES <= BACKWARD_BLOCK_BYTES and groups >= GROUP_MIN_BLOCKS:
        return Plan("cuda", "backward", layout, ("channel_group_backward_kernel",), {},
                    f"a block per {GROUP_BYTES} bytes of channels holds dy and x: each read once")
    if fused and layout == "nchw" and 2 * rows * x.element_size() <= BACKWARD_BLOCK_BYTES:
        return Plan("cuda", "backward", layout, ("channel_backward_kernel",), {},
                    "a block per channel holds dy and x in shared memory: each read once")
    return Plan("cuda", "backward", layout, (f"{layout}_backward_reduce_kernel", "backward_finalize_kernel",
                                              f"{layout}_backward_elementwise_kernel"), {},
                "sums, their finalize, then dx: dy and x read twice")


def triton_backward(x, fused: bool = True) -> Plan:
    """The Triton backward plan for x: the training forward's tiles (CHANNEL_TILE_ELEMENTS, GROUP_CHANNELS);
    fused=False: the three-kernel one."""
    n, c, h, w = x.shape
    layout = layout_of(x)
    tile = triton.next_power_of_2(n) * triton.next_power_of_2(h * w) if layout == "nchw" else (
        triton.next_power_of_2(n * h * w) * min(triton.next_power_of_2(c), GROUP_CHANNELS))
    if fused and tile <= CHANNEL_TILE_ELEMENTS:
        if layout == "nchw":
            return Plan("triton", "backward", layout, ("backward_channel_kernel",), {},
                        "a program per channel holds dy and x in one tile: each read once")
        return Plan("triton", "backward", layout, ("backward_channel_group_kernel",), {},
                    f"a program per {GROUP_CHANNELS} channels holds dy and x in one tile: each read once")
    return Plan("triton", "backward", layout, (f"backward_reduce_{layout}_kernel", "backward_finalize_kernel",
                                                "backward_dx_flat_kernel"), {},
                "sums, their finalize, then dx: dy and x read twice")
