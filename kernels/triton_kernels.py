"""The Triton backend: the same operation as the CUDA module, as one Triton kernel.

Both layouts are a row-major matrix of R rows by L columns, and one kernel serves both:

* contiguous NCHW: rows are the N*C planes, L = H*W, and the channel of row r is r % C;
* channels_last:   rows are the N*H*W pixels, L = C, and the channel of column l is l.

A program normalises one [BLOCK_R, BLOCK_L] tile. Small planes (7x7) put many rows in one tile, so no
program idles on a tiny plane; scale and shift are computed once per row (or column) of the tile.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class TritonConfig(NamedTuple):
    """Tile shape and warps of the Triton kernel; 0 fields take the heuristic default."""

    block_r: int = 0  # rows per program (a power of two)
    block_l: int = 0  # columns per program (a power of two)
    num_warps: int = 0


# Elements per program of the default tile: large enough that a program moves tens of kilobytes.
TILE_ELEMENTS = 8192
MAX_BLOCK_L = 4096


def default_config(rows: int, cols: int) -> TritonConfig:
    """A tile of about TILE_ELEMENTS: as wide as a row allows, then as many rows as fill it."""
    block_l = min(triton.next_power_of_2(max(cols, 1)), MAX_BLOCK_L)
    block_r = min(max(TILE_ELEMENTS // block_l, 1), triton.next_power_of_2(max(rows, 1)))
    num_warps = 8 if block_r * block_l >= 8192 else 4
    return TritonConfig(block_r, block_l, num_warps)


@triton.jit
def _affine(c, mask, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """scale = weight / sqrt(var + eps), shift = bias - mean * scale, for the channels in `c`."""
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(ACC)
    var = tl.load(var_ptr + c, mask=mask, other=1.0).to(ACC)
    scale = tl.rsqrt(var + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c, mask=mask, other=1.0).to(ACC)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c, mask=mask, other=0.0).to(ACC)
    return scale, shift


@triton.jit
def normalize_kernel(x_ptr, y_ptr, weight_ptr, bias_ptr, mean_ptr, var_ptr, eps,
                     R, L, C,
                     CHANNEL_PER_ROW: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, ROW_LEN: tl.constexpr):
    if ROW_LEN:
        # A row length known at compile time tells Triton how far each row start is aligned (a run-time
        # length is only known to be a multiple of 16 or not), so 14x14 planes keep 8-byte accesses.
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


def normalize(x, y, weight, bias, mean, var, eps: float, layout: str, config):
    """y = x * scale[c] + shift[c] for `layout` in ("nchw", "channels_last"); x and y share strides.
    `config` holds a TritonConfig's fields in order (0: the default)."""
    n, c, h, w = x.shape
    if layout == "nchw":
        rows, cols = n * c, h * w
    else:
        rows, cols = n * h * w, c
    if x.numel() == 0:
        return
    block_r, block_l, num_warps = (
        given or default
        for given, default in zip(config, default_config(rows, cols))
    )
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(cols, block_l),)
    normalize_kernel[grid](
        x, y, weight, bias, mean, var, eps, rows, cols, c,
        CHANNEL_PER_ROW=layout == "nchw", HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
        BLOCK_R=block_r, BLOCK_L=block_l, ROW_LEN=cols if cols % 16 and cols <= MAX_BLOCK_L else 0,
        num_warps=num_warps,
    )
