"""The Triton backend: the same operations as the CUDA module. Normalisation is a tile kernel or a flat one
(the rule: `dispatch.triton_eval`), and training's batch statistics two (a statistics kernel and its finalize, below
`normalize`).

For the tile kernel both layouts are a row-major matrix of R rows by L columns:

* contiguous NCHW: rows are the N*C planes, L = H*W, and the channel of row r is r % C;
* channels_last:   rows are the N*H*W pixels, L = C, and the channel of column l is l.

A program of the tile kernel normalises one [BLOCK_R, BLOCK_L] tile. Small planes put many rows in one tile,
so no program idles on a tiny plane; scale and shift are computed once per row (or column) of the tile. Most
tensors take a flat kernel instead: the tile kernel is kept for large 16-bit ones.
"""
import torch
import triton
import triton.language as tl

from .dispatch import tile_config


@triton.jit
def _scale_shift(c, mask, mean, var, weight_ptr, bias_ptr, eps,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """scale = weight / sqrt(var + eps), shift = bias - mean * scale, for the channels in `c`."""
    scale = tl.rsqrt(var + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=mask, other=1.0).to(ACC)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c, mask=mask, other=0.0).to(ACC)
    return scale, shift


@triton.jit
def _affine(c, mask, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """_scale_shift with the channels' mean and var loaded from memory."""
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(ACC)
    var = tl.load(var_ptr + c, mask=mask, other=1.0).to(ACC)
    return _scale_shift(c, mask, mean, var, weight_ptr, bias_ptr, eps, HAS_WEIGHT, HAS_BIAS, ACC)


@triton.jit
def normalize_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
                     R, L, C,
                     CHANNEL_PER_ROW: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, ROW_LEN: tl.constexpr):
    if ROW_LEN:
        # A row length known at compile time tells Triton how far each row start is aligned (a run-time
        # length is only known to be a multiple of 16 or not), so channels_last rows of 24 channels, say,
        # keep 16-byte accesses.
        L = ROW_LEN
    # A 1-D grid (the y and z grid dimensions stop at 65535 programs), column blocks fastest.
    col_blocks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % col_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_mask = rows < R
    col_mask = cols < L
    if CHANNEL_PER_ROW:
        scale, shift = _affine(rows % C, row_mask, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
                               HAS_WEIGHT, HAS_BIAS, ACC)
        scale = scale[:, None]
        shift = shift[:, None]
    else:
        scale, shift = _affine(cols, col_mask, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
                               HAS_WEIGHT, HAS_BIAS, ACC)
        scale = scale[None, :]
        shift = shift[None, :]
    offsets = rows[:, None] * L + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
    tl.store(y_ptr + offsets, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


# The flat kernel reads the tensor as one aligned array and gathers each element's scale and shift by its
# channel, (offset // PLANE) % C with PLANE and C compile-time constants (PLANE: H*W for NCHW, 1 for
# channels_last), as torch.compile's generated kernel does: a division by a constant is a multiply and a shift,
# by a runtime value a long sequence, per element (a tiny tensor waits on it).
@triton.jit
def normalize_flat_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps, NUMEL, C: tl.constexpr,
                          PLANE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr, WIDE: tl.constexpr, PLANES: tl.constexpr):
    # 32-bit offsets unless the tensor needs more: the division below runs per element (and the modulo where
    # PLANES is 0), and in 64 bits each is a long instruction sequence.
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < NUMEL
    if PLANES:
        # Scale and shift of the PLANES planes from the program's first on, then each element's from its
        # plane: four loads and an rsqrt per plane instead of per element, and no modulo per element.
        first = pid * BLOCK // PLANE
        planes = first + tl.arange(0, PLANES)
        plane_scale, plane_shift = _affine(planes % C, planes <= (NUMEL - 1) // PLANE, weight_ptr, bias_ptr,
                                           mean_ptr, var_ptr, eps, HAS_WEIGHT, HAS_BIAS, ACC)
        plane = offsets // PLANE - first
        scale = tl.gather(plane_scale, plane, 0)
        shift = tl.gather(plane_shift, plane, 0)
    else:
        scale, shift = _affine((offsets // PLANE) % C, mask, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
                               HAS_WEIGHT, HAS_BIAS, ACC)
    x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
    tl.store(y_ptr + offsets, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


def normalize(x, y, weight, bias, mean, var, eps: float, plan):
    """y = x * scale[c] + shift[c] by an eval `plan` (dispatch.triton_eval); x and y share strides."""
    n, c, h, w = x.shape
    if x.numel() == 0:
        return
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                  ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)
    launch = dict(plan.launch)
    if plan.kernels == ("normalize_flat_kernel",):
        normalize_flat_kernel[(triton.cdiv(x.numel(), launch["BLOCK"]),)](
            x, y, weight, bias, mean, var, eps, x.numel(), c, PLANE=h * w if plan.layout == "nchw" else 1,
            **common, **launch)
        return
    rows, cols = launch.pop("rows"), launch.pop("cols")
    grid = (triton.cdiv(rows, launch["BLOCK_R"]) * triton.cdiv(cols, launch["BLOCK_L"]),)
    normalize_kernel[grid](x, y, weight, bias, mean, var, eps, rows, cols, c, CHANNEL_PER_ROW=plan.layout == "nchw",
                           **common, **launch)


# Training mode: per-channel batch statistics. A first kernel summarises parts of each channel as
# (count, mean, M2) -- a tile at a time, each tile's mean and M2 computed from the tile itself and merged
# into the running summary with Chan's formula, in float64 across tiles, so no sum of squares loses the
# variance of 16.7 million elements -- and a second merges the parts of each channel, writes the batch mean
# and biased variance, and updates the running statistics as PyTorch does.

# channels_last: programs per channel block over the rows (enough to fill an H100 several times), each a tile
# of STATS_TILE_ELEMENTS at a time.
STATS_ROW_CHUNKS = 512
STATS_TILE_ELEMENTS = 8192
# The finalize's tile: FINALIZE_PARTS pieces of FINALIZE_CHANNELS channels, so that 64 channels take 8
# programs (one program for all 64 read 512 x 64 x 3 doubles from one SM: 40 us under ncu).
FINALIZE_PARTS = 256
FINALIZE_CHANNELS = 8


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s combination of two (count, mean, M2) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    w = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _tile_summary(x, mask, AXIS: tl.constexpr):
    """(count, mean, M2) of the masked tile x along AXIS, in float64."""
    n = tl.sum(mask.to(tl.float64), axis=AXIS)
    mean = tl.sum(tl.where(mask, x, 0.0), axis=AXIS) / tl.maximum(n, 1.0).to(x.dtype)
    d = tl.where(mask, x - tl.expand_dims(mean, AXIS), 0.0)
    return n, mean.to(tl.float64), tl.sum(d * d, axis=AXIS).to(tl.float64)


@triton.jit
def stats_kernel(x_ptr, n_ptr, mean_ptr, m2_ptr, R, L, C, ROWS_PER_CHUNK,
                 CHANNEL_PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if CHANNEL_PER_ROW:
        # NCHW: a program summarises BLOCK_R planes of one channel (rows b * C + c of the R = N * C planes);
        # part (b, c) is at b * C + c.
        c = pid % C
        block = pid // C
        batch = block * BLOCK_R + tl.arange(0, BLOCK_R)
        rows = batch * C + c
        n = tl.zeros([], tl.float64)
        mean = tl.zeros([], tl.float64)
        m2 = tl.zeros([], tl.float64)
        for start in range(0, L, BLOCK_L):
            cols = start + tl.arange(0, BLOCK_L)
            mask = (rows < R)[:, None] & (cols < L)[None, :]
            x = tl.load(x_ptr + rows[:, None] * L + cols[None, :], mask=mask).to(ACC)
            tile_n, tile_mean, tile_m2 = _tile_summary(tl.reshape(x, [BLOCK_R * BLOCK_L]),
                                                       tl.reshape(mask, [BLOCK_R * BLOCK_L]), 0)
            n, mean, m2 = _merge(n, mean, m2, tile_n, tile_mean, tile_m2)
        parts = block * C + c
        part_mask = True
    else:
        # channels_last: a program summarises ROWS_PER_CHUNK pixels of BLOCK_L channels; part (chunk, c) is
        # at chunk * C + c.
        col_blocks = tl.cdiv(L, BLOCK_L)
        chunk = pid // col_blocks
        cols = (pid % col_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        stop = tl.minimum((chunk + 1) * ROWS_PER_CHUNK, R)
        n = tl.zeros([BLOCK_L], tl.float64)
        mean = tl.zeros([BLOCK_L], tl.float64)
        m2 = tl.zeros([BLOCK_L], tl.float64)
        for start in range(chunk * ROWS_PER_CHUNK, stop, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            mask = (rows < stop)[:, None] & (cols < L)[None, :]
            x = tl.load(x_ptr + rows[:, None] * L + cols[None, :], mask=mask).to(ACC)
            tile_n, tile_mean, tile_m2 = _tile_summary(x, mask, 0)
            n, mean, m2 = _merge(n, mean, m2, tile_n, tile_mean, tile_m2)
        parts = chunk * L + cols
        part_mask = cols < L
    tl.store(n_ptr + parts, n, mask=part_mask)
    tl.store(mean_ptr + parts, mean, mask=part_mask)
    tl.store(m2_ptr + parts, m2, mask=part_mask)


@triton.jit
def finalize_kernel(n_ptr, mean_ptr, m2_ptr, P, C, batch_mean_ptr, batch_var_ptr, running_mean_ptr,
                    running_var_ptr, momentum, HAS_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Merge the P parts of each of BLOCK_C channels (part p of channel c at p * C + c)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    total = tl.zeros([BLOCK_C], tl.float64)
    weighted = tl.zeros([BLOCK_C], tl.float64)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        part_n = tl.load(n_ptr + offsets, mask=mask, other=0.0)
        total += tl.sum(part_n, axis=0)
        weighted += tl.sum(part_n * tl.load(mean_ptr + offsets, mask=mask, other=0.0), axis=0)
    mean = weighted / tl.maximum(total, 1.0)  # masked-off channels have no parts
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for start in range(0, P, BLOCK_P):  # M2 = sum of the parts' M2 + n_p * (mean_p - mean)^2
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        d = tl.load(mean_ptr + offsets, mask=mask, other=0.0) - mean[None, :]
        part_n = tl.load(n_ptr + offsets, mask=mask, other=0.0)
        m2 += tl.sum(tl.load(m2_ptr + offsets, mask=mask, other=0.0) + part_n * d * d, axis=0)
    tl.store(batch_mean_ptr + c, mean.to(batch_mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(batch_var_ptr + c, (m2 / tl.maximum(total, 1.0)).to(batch_var_ptr.dtype.element_ty), mask=c_mask)
    if HAS_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, c, c_mask, mean, m2 / tl.maximum(total - 1, 1.0), momentum)


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, c, mask, mean, unbiased_var, momentum):
    """As PyTorch: the running statistics move towards the batch's, the variance with Bessel's correction."""
    old_mean = tl.load(running_mean_ptr + c, mask=mask).to(tl.float64)
    old_var = tl.load(running_var_ptr + c, mask=mask).to(tl.float64)
    new_mean = (1 - momentum) * old_mean + momentum * mean.to(tl.float64)
    new_var = (1 - momentum) * old_var + momentum * unbiased_var.to(tl.float64)
    tl.store(running_mean_ptr + c, new_mean.to(running_mean_ptr.dtype.element_ty), mask=mask)
    tl.store(running_var_ptr + c, new_var.to(running_var_ptr.dtype.element_ty), mask=mask)


def batch_stats(x, running_mean, running_var, momentum: float, plan):
    """Batch mean and biased variance per channel (float32; float64 for float64 input), and the running
    statistics updated in place as PyTorch does (when given), by a three-kernel training `plan`."""
    n, c, h, w = x.shape
    layout = plan.layout
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if layout == "nchw":
        rows, cols = n * c, h * w
        block_r, block_l, _ = tile_config(n, cols)  # a tile of planes of one channel
        parts = triton.cdiv(n, block_r)
        grid, rows_per_chunk = (parts * c,), rows
    else:
        rows, cols = n * h * w, c
        block_l = min(triton.next_power_of_2(cols), 64)
        block_r = max(STATS_TILE_ELEMENTS // block_l, 1)
        parts = min(STATS_ROW_CHUNKS, triton.cdiv(rows, block_r))
        rows_per_chunk = triton.cdiv(rows, parts)
        grid = (parts * triton.cdiv(cols, block_l),)
    summary = torch.empty(3, parts * c, device=x.device, dtype=torch.float64)
    stats_kernel[grid](x, summary[0], summary[1], summary[2], rows, cols, c, rows_per_chunk,
                       CHANNEL_PER_ROW=layout == "nchw", ACC=tl.float64 if acc == torch.float64 else tl.float32,
                       BLOCK_R=block_r, BLOCK_L=block_l)
    mean = torch.empty(c, device=x.device, dtype=acc)
    var = torch.empty_like(mean)
    has_running = running_mean is not None
    block_c = min(triton.next_power_of_2(c), FINALIZE_CHANNELS)
    finalize_kernel[(triton.cdiv(c, block_c),)](
        summary[0], summary[1], summary[2], parts, c, mean, var,
        running_mean if has_running else mean, running_var if has_running else var, momentum,
        HAS_RUNNING=has_running, BLOCK_P=FINALIZE_PARTS, BLOCK_C=block_c)
    return mean, var


# Training in one program per channel (NCHW) or per group of channels (channels_last) where that fits in one
# tile (the rule: dispatch.triton_train): the program loads its channels once, takes their mean and then the
# spread around it from registers, updates the running statistics and writes the channels normalised -- x read
# once, one launch. Triton's counterpart of the CUDA module's block-per-channel kernels.
@triton.jit
def channel_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, momentum, eps, N, C, L,
                   save_mean_ptr, save_var_ptr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr, SAVE: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, ROW_LEN: tl.constexpr):
    if ROW_LEN:  # as in normalize_kernel: a compile-time row length keeps the rows' alignment known
        L = ROW_LEN
    c = tl.program_id(0).to(tl.int64)
    batch = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_L)
    mask = (batch < N)[:, None] & (cols < L)[None, :]
    offsets = (batch[:, None] * C + c) * L + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    count = N * L
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
    if SAVE:  # the batch statistics, for the backward
        tl.store(save_mean_ptr + c, mean)
        tl.store(save_var_ptr + c, var)
    if HAS_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, c, True, mean, var * count / tl.maximum(count - 1, 1),
                        momentum)
    scale, shift = _scale_shift(c, True, mean, var, weight_ptr, bias_ptr, eps, HAS_WEIGHT, HAS_BIAS, ACC)
    tl.store(y_ptr + offsets, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_group_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, momentum, eps, R, C,
                         save_mean_ptr, save_var_ptr,
                         HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
                         SAVE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    c_mask = c < C
    mask = (rows < R)[:, None] & c_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=0) / R
    d = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(d * d, axis=0) / R
    if SAVE:  # the batch statistics, for the backward
        tl.store(save_mean_ptr + c, mean, mask=c_mask)
        tl.store(save_var_ptr + c, var, mask=c_mask)
    if HAS_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, c, c_mask, mean, var * R / tl.maximum(R - 1, 1),
                        momentum)
    scale, shift = _scale_shift(c, c_mask, mean, var, weight_ptr, bias_ptr, eps, HAS_WEIGHT, HAS_BIAS, ACC)
    tl.store(y_ptr + offsets, (x * scale[None, :] + shift[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


def fused_training(x, y, weight, bias, running_mean, running_var, momentum: float, eps: float, plan, save=None):
    """y = x normalised with its batch statistics, the running statistics updated, by a read-once training
    `plan` (dispatch.triton_train) reading x once; `save`: (mean, var) to receive the batch statistics."""
    n, c, h, w = x.shape
    has_running = running_mean is not None
    common = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING=has_running,
                  SAVE=save is not None, ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, **plan.launch)
    running = (running_mean if has_running else x, running_var if has_running else x)
    saved = save if save is not None else (x, x)
    if plan.kernels == ("channel_group_kernel",):
        channel_group_kernel[(triton.cdiv(c, plan.launch["BLOCK_C"]),)](
            x, y, weight, bias, *running, momentum, eps, n * h * w, c, *saved, **common)
        return
    channel_kernel[(c,)](x, y, weight, bias, *running, momentum, eps, n, c, h * w, *saved, **common,
                         ROW_LEN=h * w if h * w % 16 else 0)
