"""The Triton backward of BatchNorm2d: dx, dweight and dbias from dy, x and the statistics the forward used.

With M = N*H*W, invstd = rsqrt(var + eps) and w = weight (1 without one), per channel c:

* training (mean, var the batch's): dx = w*invstd*(dy - sum(dy)/M - (x-mean)*invstd^2*sum(dy*(x-mean))/M);
* frozen (eval with running statistics): dx = dy*w*invstd;
* both: dweight = invstd*sum(dy*(x-mean)), dbias = sum(dy).

Two sums per channel, then one elementwise pass: dx = dy * a[c] + (x - mean[c]) * b[c] + k[c] (frozen: b = k
= 0, and no sums are needed for dx; x - mean, not x with the mean folded into k, which cancels where the mean is
large against the spread). Three kernels do it in general -- a reduction per layout writing partial sums per
(part, channel), a finalize merging the parts into dweight, dbias and the coefficients, and a flat dx kernel --
and one read-once kernel where a channel (NCHW) or a group of channels (channels_last) fits in one tile, as the
training forward does. The rule: dispatch.triton_backward.

Both layouts are a row-major matrix as in triton_kernels: NCHW rows are the N*C planes of L = H*W elements
(channel of row r: r % C), channels_last rows are the N*H*W pixels of C channels. x and dy share the layout;
dx is written with x's strides.
"""
import torch
import triton
import triton.language as tl

from .dispatch import GROUP_CHANNELS, MAX_BLOCK_L, TILE_ELEMENTS, tile_config


@triton.jit
def _param_grads(c, mask, invstd, sum_dy, sum_dy_xmu, dweight_ptr, dbias_ptr,
                 DWEIGHT: tl.constexpr, DBIAS: tl.constexpr):
    """dweight = invstd * sum(dy * (x - mean)) and dbias = sum(dy), stored where asked."""
    if DWEIGHT:
        tl.store(dweight_ptr + c, (invstd * sum_dy_xmu).to(dweight_ptr.dtype.element_ty), mask=mask)
    if DBIAS:
        tl.store(dbias_ptr + c, sum_dy.to(dbias_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_coefficients(c, mask, invstd, sum_dy, sum_dy_xmu, count, weight_ptr,
                     HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, ACC: tl.constexpr):
    """(a, b, k) of dx = dy * a + (x - mean) * b + k: a = w * invstd; in training the mean's and the variance's
    gradients folded into b = -a * invstd^2 * sum(dy * (x - mean)) / M and k = -a * sum(dy) / M (frozen: b = k
    = 0)."""
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + c, mask=mask, other=1.0).to(ACC)
    if TRAINING:
        b = -a * invstd * invstd * (sum_dy_xmu / count)
        k = -a * (sum_dy / count)
    else:
        b = a * 0
        k = a * 0
    return a, b, k


# The reduction: partial (sum(dy), sum(dy * (x - mean))) per (part, channel), part p of channel c at p * C + c.
# Each program keeps a tile-shaped accumulator (every lane sums a strided share of its elements) and reduces it
# once at the end, and the finalize merges a channel's parts the same way, so no sum is a long serial one.
# The partial sums are float32 (float64 for float64 input). Tiles as the forward's statistics kernel takes them.
REDUCE_TILE_ELEMENTS = TILE_ELEMENTS
# channels_last: channels per program and programs per channel block over the rows (those of
# triton_kernels.batch_stats: 64 channels, STATS_ROW_CHUNKS).
REDUCE_CHANNELS = 64
REDUCE_ROW_CHUNKS = 512
# The finalize's tile (triton_kernels.FINALIZE_PARTS and FINALIZE_CHANNELS, their reason).
FINALIZE_PARTS = 256
FINALIZE_CHANNELS = 8


@triton.jit
def backward_reduce_nchw_kernel(dy_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr, N, C, L,
                                SUM_XMU: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_L: tl.constexpr, ROW_LEN: tl.constexpr):
    """A program sums BLOCK_N planes of one channel (rows b * C + c), looping over the plane; its part is the
    block of planes."""
    if ROW_LEN:  # as in triton_kernels.normalize_kernel: a compile-time row length keeps the rows' alignment known
        L = ROW_LEN
    pid = tl.program_id(0).to(tl.int64)
    c = pid % C
    block = pid // C
    batch = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = batch * C + c
    acc_dy = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    acc_dy_xmu = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    if SUM_XMU:
        mean = tl.load(mean_ptr + c).to(ACC)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = (batch < N)[:, None] & (cols < L)[None, :]
        offsets = rows[:, None] * L + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        acc_dy += dy
        if SUM_XMU:  # masked-off elements have dy = 0
            acc_dy_xmu += dy * (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - mean)
    part = block * C + c
    tl.store(sum_dy_ptr + part, tl.sum(tl.sum(acc_dy, axis=1), axis=0))
    if SUM_XMU:
        tl.store(sum_dy_xmu_ptr + part, tl.sum(tl.sum(acc_dy_xmu, axis=1), axis=0))


@triton.jit
def backward_reduce_channels_last_kernel(dy_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr, R, C, ROWS_PER_CHUNK,
                                         SUM_XMU: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                                         BLOCK_C: tl.constexpr):
    """A program sums ROWS_PER_CHUNK pixels of BLOCK_C channels; its part is the chunk of rows."""
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(C, BLOCK_C)
    chunk = pid // col_blocks
    c = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    stop = tl.minimum((chunk + 1) * ROWS_PER_CHUNK, R)
    acc_dy = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    acc_dy_xmu = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    if SUM_XMU:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)[None, :]
    for start in range(chunk * ROWS_PER_CHUNK, stop, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < stop)[:, None] & c_mask[None, :]
        offsets = rows[:, None] * C + c[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        acc_dy += dy
        if SUM_XMU:  # masked-off elements have dy = 0
            acc_dy_xmu += dy * (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - mean)
    parts = chunk * C + c
    tl.store(sum_dy_ptr + parts, tl.sum(acc_dy, axis=0), mask=c_mask)
    if SUM_XMU:
        tl.store(sum_dy_xmu_ptr + parts, tl.sum(acc_dy_xmu, axis=0), mask=c_mask)


@triton.jit
def backward_finalize_kernel(sum_dy_ptr, sum_dy_xmu_ptr, P, C, count, var_ptr, weight_ptr, eps,
                             dweight_ptr, dbias_ptr, coef_ptr,
                             HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, SUM_XMU: tl.constexpr,
                             DX: tl.constexpr, DWEIGHT: tl.constexpr, DBIAS: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the P parts of each of BLOCK_C channels; write dweight and dbias where asked and, for dx, its
    coefficients a, b, k at coef_ptr + (0, C, 2C) + c (a alone when frozen; P = 0 when nothing was summed)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_dy = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    acc_dy_xmu = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offsets = p[:, None] * C + c[None, :]
        acc_dy += tl.load(sum_dy_ptr + offsets, mask=mask, other=0.0)
        if SUM_XMU:
            acc_dy_xmu += tl.load(sum_dy_xmu_ptr + offsets, mask=mask, other=0.0)
    sum_dy = tl.sum(acc_dy, axis=0)
    sum_dy_xmu = tl.sum(acc_dy_xmu, axis=0)
    invstd = tl.rsqrt(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(ACC) + eps)
    _param_grads(c, c_mask, invstd, sum_dy, sum_dy_xmu, dweight_ptr, dbias_ptr, DWEIGHT, DBIAS)
    if DX:
        a, b, k = _dx_coefficients(c, c_mask, invstd, sum_dy, sum_dy_xmu, count, weight_ptr,
                                   HAS_WEIGHT, TRAINING, ACC)
        tl.store(coef_ptr + c, a, mask=c_mask)
        if TRAINING:
            tl.store(coef_ptr + C + c, b, mask=c_mask)
            tl.store(coef_ptr + 2 * C + c, k, mask=c_mask)


# The dx pass reads dy (and x in training) as one flat array, each element's coefficients gathered by its channel,
# (offset // PLANE) % C with PLANE a compile-time constant (H*W for NCHW, 1 for channels_last), as
# triton_kernels.normalize_flat_kernel does; its block: one 16-byte vector of float32 per thread of DX_WARPS warps.
DX_BLOCK = 512
DX_WARPS = 4


@triton.jit
def backward_dx_flat_kernel(dy_ptr, x_ptr, dx_ptr, coef_ptr, mean_ptr, NUMEL, C, PLANE: tl.constexpr,
                            TRAINING: tl.constexpr,
                            ACC: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # 32-bit offsets unless the tensor needs more (the division and modulo per element are long in 64 bits).
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < NUMEL
    c = (offsets // PLANE) % C
    dx = tl.load(dy_ptr + offsets, mask=mask).to(ACC) * tl.load(coef_ptr + c)
    if TRAINING:
        x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
        dx += (x - tl.load(mean_ptr + c).to(ACC)) * tl.load(coef_ptr + C + c) + tl.load(coef_ptr + 2 * C + c)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# The read-once kernels: one program per channel (NCHW) or per GROUP_CHANNELS channels (channels_last) loads its
# dy and x once, sums, writes dweight and dbias, and dx from the same registers -- one launch, dy and x read once.


@triton.jit
def backward_channel_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, weight_ptr, eps, dweight_ptr, dbias_ptr,
                            N, C, L, HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, SUM_XMU: tl.constexpr,
                            DX: tl.constexpr, DWEIGHT: tl.constexpr, DBIAS: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, ROW_LEN: tl.constexpr):
    if ROW_LEN:
        L = ROW_LEN
    c = tl.program_id(0).to(tl.int64)
    batch = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_L)
    mask = (batch < N)[:, None] & (cols < L)[None, :]
    offsets = (batch[:, None] * C + c) * L + cols[None, :]
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    sum_dy = tl.sum(tl.sum(dy, axis=1), axis=0)
    sum_dy_xmu = sum_dy * 0
    if SUM_XMU:  # masked-off elements have dy = 0
        xmu = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - tl.load(mean_ptr + c).to(ACC)
        sum_dy_xmu = tl.sum(tl.sum(dy * xmu, axis=1), axis=0)
    invstd = tl.rsqrt(tl.load(var_ptr + c).to(ACC) + eps)
    _param_grads(c, True, invstd, sum_dy, sum_dy_xmu, dweight_ptr, dbias_ptr, DWEIGHT, DBIAS)
    if DX:
        a, b, k = _dx_coefficients(c, True, invstd, sum_dy, sum_dy_xmu, N * L, weight_ptr,
                                   HAS_WEIGHT, TRAINING, ACC)
        dx = dy * a
        if TRAINING:
            dx += xmu * b + k
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_channel_group_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, weight_ptr, eps, dweight_ptr, dbias_ptr,
                                  R, C, HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, SUM_XMU: tl.constexpr,
                                  DX: tl.constexpr, DWEIGHT: tl.constexpr, DBIAS: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_R)
    c_mask = c < C
    mask = (rows < R)[:, None] & c_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * C + c[None, :]
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
    sum_dy = tl.sum(dy, axis=0)
    sum_dy_xmu = sum_dy * 0
    if SUM_XMU:  # masked-off elements have dy = 0
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
        xmu = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - mean[None, :]
        sum_dy_xmu = tl.sum(dy * xmu, axis=0)
    invstd = tl.rsqrt(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(ACC) + eps)
    _param_grads(c, c_mask, invstd, sum_dy, sum_dy_xmu, dweight_ptr, dbias_ptr, DWEIGHT, DBIAS)
    if DX:
        a, b, k = _dx_coefficients(c, c_mask, invstd, sum_dy, sum_dy_xmu, R, weight_ptr,
                                   HAS_WEIGHT, TRAINING, ACC)
        dx = dy * a[None, :]
        if TRAINING:
            dx += xmu * b[None, :] + k[None, :]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def backward(dy, x, mean, var, weight, eps: float, training: bool, needs, plan):
    """(dx, dweight, dbias) of y = (x - mean) * rsqrt(var + eps) * weight + bias, each None unless asked in
    `needs` (dweight also without a weight). `training`: mean and var are x's batch statistics (their
    gradients fold into dx); else frozen running statistics. dy and x are laid out alike as the `plan`'s layout
    (dispatch.triton_backward); dx takes x's strides, dweight weight's dtype, dbias weight's dtype (x's without a
    weight)."""
    layout, kernel = plan.layout, plan.kernels[0]
    n, c, h, w = x.shape
    need_dx, need_dweight, need_dbias = needs[0], needs[1] and weight is not None, needs[2]
    dx = torch.empty_like(x) if need_dx else None
    dweight = torch.empty_like(weight) if need_dweight else None
    dbias = torch.empty(c, device=x.device, dtype=x.dtype if weight is None else weight.dtype) if need_dbias else None
    if x.numel() == 0:  # as PyTorch: the sums of an empty batch are zero
        for t in (dweight, dbias):
            if t is not None:
                t.zero_()
        return dx, dweight, dbias
    if not (need_dx or need_dweight or need_dbias):
        return dx, dweight, dbias
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sum_xmu = need_dweight or (need_dx and training)
    flags = dict(HAS_WEIGHT=weight is not None, TRAINING=training, SUM_XMU=sum_xmu, DX=need_dx,
                 DWEIGHT=need_dweight, DBIAS=need_dbias, ACC=tl.float64 if acc == torch.float64 else tl.float32)
    # Pointers not read under the flags still need a tensor: x stands in.
    weight_in, dweight_out, dbias_out = (t if t is not None else x for t in (weight, dweight, dbias))
    args = (dy, x, dx if need_dx else x, mean, var, weight_in, eps, dweight_out, dbias_out)
    if kernel == "backward_channel_kernel":
        block_n, block_l = triton.next_power_of_2(n), triton.next_power_of_2(h * w)
        backward_channel_kernel[(c,)](*args, n, c, h * w, **flags, BLOCK_N=block_n, BLOCK_L=block_l,
                                      ROW_LEN=h * w if h * w % 16 else 0,
                                      num_warps=8 if block_n * block_l >= 4096 else 4)
        return dx, dweight, dbias
    if kernel == "backward_channel_group_kernel":
        block_r, block_c = triton.next_power_of_2(n * h * w), min(triton.next_power_of_2(c), GROUP_CHANNELS)
        backward_channel_group_kernel[(triton.cdiv(c, block_c),)](
            *args, n * h * w, c, **flags, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=8 if block_r * block_c >= 4096 else 4)
        return dx, dweight, dbias

    # Reduction (none when only a frozen dx is asked: it needs no sums; the finalize then merges no parts), then
    # the finalize.
    reduce = sum_xmu or need_dbias
    if layout == "nchw":
        block_n, block_l, num_warps = tile_config(n, h * w, REDUCE_TILE_ELEMENTS)
        parts = triton.cdiv(n, block_n) if reduce else 0
    else:
        rows = n * h * w
        block_c = min(triton.next_power_of_2(c), REDUCE_CHANNELS)
        block_r = max(REDUCE_TILE_ELEMENTS // block_c, 1)
        parts = min(REDUCE_ROW_CHUNKS, triton.cdiv(rows, block_r)) if reduce else 0
    sums = torch.empty(2, max(parts * c, 1), device=x.device, dtype=acc)
    if reduce:
        if layout == "nchw":
            backward_reduce_nchw_kernel[(parts * c,)](
                dy, x, mean, sums[0], sums[1], n, c, h * w, SUM_XMU=sum_xmu, ACC=flags["ACC"], BLOCK_N=block_n,
                BLOCK_L=block_l, ROW_LEN=h * w if h * w % 16 and h * w <= MAX_BLOCK_L else 0, num_warps=num_warps)
        else:
            backward_reduce_channels_last_kernel[(parts * triton.cdiv(c, block_c),)](
                dy, x, mean, sums[0], sums[1], rows, c, triton.cdiv(rows, parts), SUM_XMU=sum_xmu,
                ACC=flags["ACC"], BLOCK_R=block_r, BLOCK_C=block_c,
                num_warps=8 if block_r * block_c >= 8192 else 4)
    coef = torch.empty(3 if training else 1, c, device=x.device, dtype=acc) if need_dx else sums
    block_c = min(triton.next_power_of_2(c), FINALIZE_CHANNELS)
    backward_finalize_kernel[(triton.cdiv(c, block_c),)](
        sums[0], sums[1], parts, c, n * h * w, var, weight_in, eps, dweight_out, dbias_out, coef, **flags,
        BLOCK_P=FINALIZE_PARTS, BLOCK_C=block_c)
    if need_dx:
        numel = x.numel()
        backward_dx_flat_kernel[(triton.cdiv(numel, DX_BLOCK),)](
            dy, x, dx, coef, mean, numel, c, PLANE=h * w if layout == "nchw" else 1, TRAINING=training,
            ACC=flags["ACC"], BLOCK=DX_BLOCK, WIDE=numel + DX_BLOCK >= 2 ** 31, num_warps=DX_WARPS)
    return dx, dweight, dbias
