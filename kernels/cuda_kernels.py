"""The CUDA backend: every CUDA kernel of the project in one `load_inline` module.

The sources below are the whole CUDA implementation, compiled once, on first use, into PyTorch's extension
cache. ``CUDA_SOURCE`` holds the kernels and their launchers and includes no ATen header, so nvcc compiles it
quickly; ``CPP_SOURCE`` holds the tensor-facing side (checks, dtype dispatch, the current stream). Kernels:

* ``nchw_kernel`` -- contiguous NCHW as a flat array cut into tiles of ``threads x UNROLL`` 16-byte vectors
  (8-byte ones where a plane is a whole number of those only: 14x14 planes in 16-bit types). The scale and
  shift of the planes a tile touches are computed once per tile, into shared memory, while the tile's loads
  are in flight. A vector that straddles two planes (7x7 planes) walks into the next plane, so every plane
  size keeps wide accesses and no block idles on a 7x7 plane.
* ``small_kernel`` -- contiguous NCHW tensors of a few megabytes, latency-bound: a 16-byte vector per thread
  and nothing else (no table, no barrier, no loop).
* ``channels_last_kernel`` -- NHWC (and NCHW with 1x1 planes, the same memory). A block owns a range of
  channels, computes their scale and shift once into shared memory, and its threads walk the rows (a span
  of consecutive rows per block at a time, from the tensor's end) with their channels' pairs in registers.
* ``small_channels_last_kernel`` -- channels_last tensors of a few megabytes: a thread per four rows of one
  16-byte vector of channels (16-bit tensors of at most 2 MB: two rows of an 8-byte vector), the channels'
  parameters loaded as vectors, no table, no barrier, no loop.
* ``naive_kernel`` -- the study's starting point: one thread per element, 256 threads, a flat 32-bit
  index and ``(x - mean) / sqrt(var + eps)`` per element.

Training mode (batch statistics; the normalisation is then one of the kernels above):

* ``nchw_stats_kernel`` / ``channels_last_stats_kernel`` -- a block summarises a piece of its channels as
  (count, mean, M2), merged with Chan's formula, into a float64 summary per piece;
* ``finalize_stats_kernel`` -- a warp per channel merges its pieces, writes the batch mean and variance and
  updates the running statistics;
* ``fused_nchw_kernel`` -- the whole training forward reading x once, for large float32 NCHW channels: a
  persistent cooperative grid that keeps each channel on chip across one grid barrier;
* ``channel_kernel`` -- the same for a channel that fits in a block's shared memory, a block per channel;
  ``channel_group_kernel`` its channels_last counterpart, a block per 32 bytes of channels
  (``read_once`` chooses between them and the three kernels).
"""
import os
import sys
from typing import NamedTuple

import torch

# Declarations both sources share: the per-channel parameters and one launch's arguments.
COMMON = r"""
#include <cstdint>
#include <cuda_runtime_api.h>

namespace bn2d {

enum class DType : int { Float, Half, BFloat16, Double };

// Per-channel tensors: each pair (mean, var) and (weight, bias) is float32 or the input's dtype. An absent
// weight or bias (affine=False) has has_weight/has_bias false and points at another valid vector of the same
// dtype, so a kernel loads all four unconditionally: no branch splits them, and their latencies overlap.
struct Params {
  const void* weight;
  const void* bias;
  const void* mean;
  const void* var;
  bool has_weight;
  bool has_bias;
  bool affine_fp32;
  bool stats_fp32;
  double eps;
};

struct Launch {
  DType dtype;
  const void* x;
  void* y;
  Params params;
  int64_t numel, channels, plane;  // plane = H * W
  int threads;  // per block; 0: the kernel's default
  bool vectorized;
  int64_t max_blocks;  // 0: a block per tile, the tensor in one sweep
  int small;  // the small-tensor kernels: -1 by size (the rule), 0 never, 1 wherever they apply
  cudaStream_t stream;
};

cudaError_t launch_nchw(const Launch& l);
cudaError_t launch_channels_last(const Launch& l);
cudaError_t launch_naive(const Launch& l);

// Training mode's batch statistics. A stats kernel summarises `parts` pieces of each channel as (count, mean,
// M2) in `summary` (three arrays of parts * channels doubles, piece p of channel c at p * channels + c); a
// finalize kernel merges each channel's pieces into its mean and biased variance (float32, float64 for
// float64 input) and updates the running statistics (float32 or the input's dtype; null: none).
// `fused`: the training forward in one kernel that reads x once and also writes y = x normalised with
// `params` (whose mean and var it ignores): a block per channel (NCHW; a channel that fits in a block's
// shared memory) or per group of channels (channels_last; 32 bytes of each row), or a persistent grid
// (contiguous NCHW, float32, 16-byte aligned, planes of whole vectors).
enum class Fused : int { None, Channel, Grid };

struct StatsLaunch {
  DType dtype;
  const void* x;
  void* y;
  Params params;
  Fused fused;
  int64_t numel, channels, plane;
  bool channels_last;
  bool vectorized;
  double* summary;
  void* mean;
  void* var;
  void* running_mean;
  void* running_var;
  bool running_fp32;
  double momentum;
  cudaStream_t stream;
};

int64_t stats_parts(const StatsLaunch& l);
cudaError_t launch_stats(const StatsLaunch& l);

}  // namespace bn2d
"""

CUDA_SOURCE = COMMON + r"""
#include <algorithm>
#include <type_traits>
#include <cooperative_groups.h>
#include <cuda_pipeline.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bn2d {
namespace {

// Each vector access moves 16 bytes; every thread has UNROLL of them in flight before the first use.
constexpr int VEC_BYTES = 16;
constexpr int UNROLL = 4;
// Tensors of at most this many bytes take a small-tensor kernel (no table, no barrier, no loop); NCHW ones of
// single elements or of 16-bit vectors that straddle planes, at most the second, up to which 16-bit
// channels_last ones take narrower threads (measured: experiments/NOTES.md, "Small tensors, a kernel of their
// own", "channels_last small tensors" and "Tensors of 4-32 MB").
constexpr int64_t SMALL_BYTES = 16 << 20, SMALL_NARROW_BYTES = 2 << 20;
// Threads per block where a launch leaves it to the kernel. channels_last's small-tensor kernel runs smaller
// blocks, each thread four rows of a 16-byte vector (one row of single elements); 16-bit tensors of at most
// SMALL_NARROW_BYTES, two rows of an 8-byte vector: a warp there is latency-bound, and half the channels per
// thread issue fewer instructions. Measured in experiments/NOTES.md, "channels_last small tensors" and
// "16-bit channels_last tensors of at most 2 MB: narrower threads".
constexpr int DEFAULT_THREADS = 256, SMALL_CHANNELS_LAST_THREADS = 128, SMALL_CHANNELS_LAST_ROWS = 4;
// The largest block a config may ask for; the kernels are compiled to fit it (at most 64 registers). Not so
// channels_last_kernel: at that cap its bfloat16 instantiation spilled on sm_90 and took 1.4-6% longer than
// float16 on large tensors, so its blocks take at most 512 threads (experiments/NOTES.md, "bfloat16
// channels_last: a spill at the 64-register cap").
constexpr int MAX_THREADS = 1024, CHANNELS_LAST_MAX_THREADS = 512;
// channels_last: at most a warp along a row (32 vectors = 512 contiguous bytes); the rest of a block takes
// more rows, so a block's channel range (and its shared-memory table) stays small.
constexpr int MAX_ROW_THREADS = 32;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_acc(float v, float& out) { out = v; }
__device__ __forceinline__ void from_acc(double v, double& out) { out = v; }
__device__ __forceinline__ void from_acc(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_param(const void* p, bool fp32, int64_t c) {
  return fp32 ? acc_t(static_cast<const float*>(p)[c]) : acc_t(to_acc(static_cast<const scalar_t*>(p)[c]));
}

template <typename acc_t> struct Affine { acc_t scale, shift; };

// A channel's weight and bias (1 and 0 where the module has none) as {scale, shift}: loaded apart from the
// statistics, so that a kernel can issue the loads before the statistics it waits for.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Affine<acc_t> weight_bias(const Params& p, int64_t c) {
  const acc_t weight = load_param<scalar_t, acc_t>(p.weight, p.affine_fp32, c);
  const acc_t bias = load_param<scalar_t, acc_t>(p.bias, p.affine_fp32, c);
  return {p.has_weight ? weight : acc_t(1), p.has_bias ? bias : acc_t(0)};
}

// y = x * scale + shift with scale = weight / sqrt(var + eps) and shift = bias - mean * scale.
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> affine_of(const Affine<acc_t>& wb, acc_t mean, acc_t var, double eps) {
  // rsqrt: one MUFU instruction in float32 (within 2 ulp); a division and a square root would each add a
  // branch to a slow path, and no load moves across a branch.
  const acc_t scale = wb.scale * rsqrt(var + static_cast<acc_t>(eps));
  return {scale, wb.shift - mean * scale};
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Affine<acc_t> affine_of(const Params& p, int64_t c, acc_t mean, acc_t var) {
  return affine_of(weight_bias<scalar_t, acc_t>(p, c), mean, var, p.eps);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Affine<acc_t> channel_affine(const Params& p, int64_t c) {
  return affine_of<scalar_t, acc_t>(p, c, load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, c),
                                    load_param<scalar_t, acc_t>(p.var, p.stats_fp32, c));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t apply(scalar_t v, const Affine<acc_t>& a) {
  scalar_t out;
  from_acc(to_acc(v) * a.scale + a.shift, out);
  return out;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec { scalar_t v[VEC]; };

// n / d for n, d < 2^31 by a multiply-high and a shift (PyTorch's IntDivider): a 32-bit division by a
// run-time divisor costs about twenty instructions, this three.
struct FastDiv {
  uint32_t magic, shift;
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

FastDiv make_fast_div(uint32_t d) {
  uint32_t shift = 0;
  while ((uint64_t(1) << shift) < d) ++shift;
  return {uint32_t((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d) / d + 1), shift};
}

// Shared memory for the per-channel tables, aligned for any Affine<acc_t>.
extern __shared__ __align__(16) unsigned char shared_table[];

// Contiguous NCHW as a flat array of `numel` elements, planes of `plane` elements, in tiles of
// blockDim.x * UNROLL * VEC elements. WHOLE: `plane` is a whole number of vectors, so no vector straddles
// two planes. A tile spans at most two planes when planes are at least a tile long; shorter planes need a
// division per vector (tile-relative positions then fit in 32 bits).
template <typename scalar_t, int VEC, bool WHOLE, bool LONG>
__global__ void __launch_bounds__(MAX_THREADS) nchw_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p,
                            int64_t numel, int64_t plane, FastDiv plane_div, int64_t channels,
                            FastDiv channel_div) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  Affine<acc_t>* table = reinterpret_cast<Affine<acc_t>*>(shared_table);
  const int tile = blockDim.x * UNROLL * VEC;
  const bool narrow = numel < (int64_t(1) << 31);
  for (int64_t start = int64_t(blockIdx.x) * tile; start < numel; start += int64_t(gridDim.x) * tile) {
    const int count = int(min(int64_t(tile), numel - start));
    vec_t in[UNROLL];
    // A whole tile (all but the last) loads whole vectors unconditionally: with a load that may not happen
    // per vector, the compiler unpacked each 16-bit vector as it arrived and reused its registers for the
    // next load, so the four loads went one at a time (the SASS of the float16 and bfloat16 kernels).
    if (count == tile) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        in[u] = *reinterpret_cast<const vec_t*>(x + start + (threadIdx.x + u * blockDim.x) * VEC);
    } else {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int e = (threadIdx.x + u * blockDim.x) * VEC;
        if (e + VEC <= count) {
          in[u] = *reinterpret_cast<const vec_t*>(x + start + e);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            if (e + j < count) in[u].v[j] = x[start + e + j];
        }
      }
    }
    // The tile's planes start at plane0, entered at position pos0.
    const int64_t plane0 = narrow ? int64_t(plane_div(uint32_t(start))) : start / plane;
    const int64_t pos0 = start - plane0 * plane;
    auto channel = [&](int64_t q) {
      return narrow ? int64_t(uint32_t(q) - channel_div(uint32_t(q)) * uint32_t(channels)) : q % channels;
    };
    // LONG planes (at least a tile): a tile spans at most two, and every thread computes both pairs itself
    // (the same loads for the whole block, so L1 hits), with no barrier. Short planes: the tile's planes'
    // pairs go to shared memory, one per thread.
    Affine<acc_t> first, second;
    if constexpr (LONG) {
      first = channel_affine<scalar_t, acc_t>(p, channel(plane0));
      second = channel_affine<scalar_t, acc_t>(p, channel(plane0 + 1));
    } else {
      const int planes = int(plane_div(uint32_t(pos0 + count - 1))) + 1;
      for (int k = threadIdx.x; k < planes; k += blockDim.x)
        table[k] = channel_affine<scalar_t, acc_t>(p, channel(plane0 + k));
      __syncthreads();
    }
    auto affine = [&](int k) {
      if constexpr (LONG) return k == 0 ? first : second;
      else return table[k];
    };
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int e = (threadIdx.x + u * blockDim.x) * VEC;
      if (e >= count) continue;
      const int64_t local = pos0 + e;
      int k = LONG ? int(local >= plane) : int(plane_div(uint32_t(local)));
      Affine<acc_t> a = affine(k);
      vec_t out;
      if (WHOLE) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = apply(in[u].v[j], a);
      } else {
        // Within a tile of short planes a position fits in 32 bits, and so does the plane's length. Compared in
        // 32 bits in 16-bit types only: float32's kernel then took 42 registers instead of 32 and ran 1-2%
        // slower (experiments/NOTES.md, "The tiled kernel's straddle walk").
        std::conditional_t<LONG, int64_t, int> pos = local - k * plane;
        using length_t = std::conditional_t<LONG || sizeof(scalar_t) != 2, int64_t, int>;
        const length_t length = length_t(plane);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (pos == length) {  // the vector crosses into the next plane
            pos = 0;
            a = affine(++k);
          }
          out.v[j] = apply(in[u].v[j], a);
          ++pos;
        }
      }
      if (e + VEC <= count) {
        *reinterpret_cast<vec_t*>(y + start + e) = out;
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (e + j < count) y[start + e + j] = out.v[j];
      }
    }
    if (!LONG && start + int64_t(gridDim.x) * tile < numel) __syncthreads();  // the next tile refills the table
  }
}

// Rows of `channels` contiguous elements (NHWC). Thread (tx, ty) of block (bx, by) owns channels
// c0 = (bx * blockDim.x + tx) * VEC .. c0 + VEC - 1 of rows ty, ty + blockDim.y, ... of a span of
// UNROLL * blockDim.y consecutive rows, then of every gridDim.y-th span, block rows taking each pass's spans
// in reverse order: blocks start in index order, so x is read from its end, the part that a pass over x in
// address order (training's statistics kernel) leaves in L2. The block's scale/shift pairs are computed once,
// into shared memory, while the first loads are in flight; each thread then keeps its VEC pairs in registers.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(CHANNELS_LAST_MAX_THREADS) channels_last_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p,
                                     int64_t rows, int64_t channels) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  Affine<acc_t>* table = reinterpret_cast<Affine<acc_t>*>(shared_table);
  const int64_t block_c0 = int64_t(blockIdx.x) * blockDim.x * VEC;
  // Written as a multiple of VEC (not block_c0 + threadIdx.x * VEC): the compiler then knows every row's
  // vector is 16-byte aligned and stores it in one instruction (else four).
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t step = int64_t(gridDim.y) * blockDim.y * UNROLL;
  const int64_t first = int64_t(gridDim.y - 1 - blockIdx.y) * blockDim.y * UNROLL + threadIdx.y;
  const bool active = c0 < channels;
  // Every load is made, the ones past the last row or channel clamped to it (an L1 hit): a load that may not
  // happen keeps the register's old value, and for bfloat16 that made the compiler wait for each load in turn.
  const scalar_t* column = x + min(c0, channels - VEC);
  vec_t in[UNROLL];
  auto load = [&](int64_t base) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      in[u] = *reinterpret_cast<const vec_t*>(column + min(base + u * blockDim.y, rows - 1) * channels);
  };
  load(first);
  const int width = int(min(int64_t(blockDim.x) * VEC, channels - block_c0));
  for (int k = threadIdx.y * blockDim.x + threadIdx.x; k < width; k += blockDim.x * blockDim.y)
    table[k] = channel_affine<scalar_t, acc_t>(p, block_c0 + k);
  __syncthreads();
  if (!active) return;
  Affine<acc_t> a[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) a[j] = table[threadIdx.x * VEC + j];
  for (int64_t base = first; base < rows; base += step) {
    if (base != first) load(base);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t r = base + u * blockDim.y;
      if (r >= rows) continue;
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = apply(in[u].v[j], a[j]);
      *reinterpret_cast<vec_t*>(y + r * channels + c0) = out;
    }
  }
}

// Small tensors are latency-bound: their launch is over in about one trip to memory and back, so this kernel
// is the shortest path from load to store -- a vector per thread, its channel's scale and shift computed
// from four loads issued along with x's, no table, no barrier, no loop (the shape of a copy kernel).
// Contiguous NCHW; STRADDLE (planes not a whole number of vectors, but at least one long): the next plane's
// pair too, for the elements past the boundary.
template <typename scalar_t, int VEC, bool STRADDLE>
__global__ void __launch_bounds__(MAX_THREADS) small_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                           const Params p, uint32_t numel, uint32_t plane,
                                                           FastDiv plane_div, uint32_t channels, FastDiv channel_div) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const uint32_t i = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (i >= numel) return;
  const auto normalized = [=](const vec_t in) {
    const uint32_t q = plane_div(i), c = q - channel_div(q) * channels;
    const Affine<acc_t> a = channel_affine<scalar_t, acc_t>(p, c);
    vec_t out;
    if constexpr (STRADDLE) {
      const Affine<acc_t> b = channel_affine<scalar_t, acc_t>(p, c + 1 == channels ? 0 : c + 1);
      const uint32_t pos = i - q * plane;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = apply(in.v[j], pos + j < plane ? a : b);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = apply(in.v[j], a);
    }
    return out;
  };
  // The partial last vector (straddling walks only: planes a whole number of vectors have none) and whole
  // vectors go from load to store on paths of their own. Had they joined, the compiler would unpack 16-bit
  // elements at the join, waiting there for x's load before issuing the parameters': two trips to memory.
  if constexpr (STRADDLE) {
    if (i + VEC > numel) {
      vec_t in;
#pragma unroll
      for (int j = 0; j < VEC; ++j) in.v[j] = x[min(i + j, numel - 1)];
      const vec_t out = normalized(in);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (i + j < numel) y[i + j] = out.v[j];
      return;
    }
  }
  const vec_t in = *reinterpret_cast<const vec_t*>(x + i);
  *reinterpret_cast<vec_t*>(y + i) = normalized(in);
}

// One parameter (float32 or the input's dtype) of VEC consecutive channels from c0, in one vector load.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_param_vector(const void* p, bool fp32, uint32_t c0, acc_t (&out)[VEC]) {
  if (fp32) {
    const auto v = *reinterpret_cast<const Vec<float, VEC>*>(static_cast<const float*>(p) + c0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = acc_t(v.v[j]);
  } else {
    const auto v = *reinterpret_cast<const Vec<scalar_t, VEC>*>(static_cast<const scalar_t*>(p) + c0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = acc_t(to_acc(v.v[j]));
  }
}

// channels_last small tensors, the same shape: a thread owns VEC consecutive channels of ROWS consecutive
// rows; it loads the rows, then its channels' parameters as vectors (four or eight loads, in flight with x's),
// and computes VEC pairs for ROWS * VEC elements. The launcher checks the parameters' alignment.
template <typename scalar_t, int VEC, int ROWS>
__global__ void __launch_bounds__(MAX_THREADS) small_channels_last_kernel(const scalar_t* __restrict__ x,
                                                                         scalar_t* __restrict__ y, const Params p,
                                                                         uint32_t rows, uint32_t vectors,
                                                                         FastDiv vectors_div) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x, g = vectors_div(t);
  const uint32_t c0 = (t - g * vectors) * VEC, r0 = g * ROWS, channels = vectors * VEC;
  if (r0 >= rows) return;
  // Rows past the last are loaded as the last one (an L1 hit) and not stored: see channels_last_kernel.
  vec_t in[ROWS];
#pragma unroll
  for (int k = 0; k < ROWS; ++k)
    in[k] = *reinterpret_cast<const vec_t*>(x + min(r0 + k, rows - 1) * channels + c0);
  acc_t weight[VEC], bias[VEC], mean[VEC], var[VEC];
  load_param_vector<scalar_t>(p.weight, p.affine_fp32, c0, weight);
  load_param_vector<scalar_t>(p.bias, p.affine_fp32, c0, bias);
  load_param_vector<scalar_t>(p.mean, p.stats_fp32, c0, mean);
  load_param_vector<scalar_t>(p.var, p.stats_fp32, c0, var);
  // weight_bias's fallback, written out: through a helper taking the loaded values, the compiler put the first
  // MUFU.RSQ, which waits for var, ahead of the weight vector's load -- a second trip to memory, 1.07x the time
  // (experiments/NOTES.md, "A refactor that cost the channels_last small kernel 7%").
  Affine<acc_t> a[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    a[j] = affine_of(Affine<acc_t>{p.has_weight ? weight[j] : acc_t(1), p.has_bias ? bias[j] : acc_t(0)}, mean[j],
                     var[j], p.eps);
#pragma unroll
  for (int k = 0; k < ROWS; ++k) {
    if (r0 + k >= rows) break;
    vec_t out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = apply(in[k].v[j], a[j]);
    *reinterpret_cast<vec_t*>(y + (r0 + k) * channels + c0) = out;
  }
}

template <typename scalar_t>
__global__ void naive_kernel(const scalar_t* x, scalar_t* y, const Params p, int numel, int plane, int channels) {
  using acc_t = typename Acc<scalar_t>::type;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx < numel) {
    const int c = (idx / plane) % channels;
    const acc_t mean = load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, c);
    const acc_t var = load_param<scalar_t, acc_t>(p.var, p.stats_fp32, c);
    const acc_t weight = p.has_weight ? load_param<scalar_t, acc_t>(p.weight, p.affine_fp32, c) : acc_t(1);
    const acc_t bias = p.has_bias ? load_param<scalar_t, acc_t>(p.bias, p.affine_fp32, c) : acc_t(0);
    const acc_t xhat = (to_acc(x[idx]) - mean) / sqrt(var + static_cast<acc_t>(p.eps));
    from_acc(xhat * weight + bias, y[idx]);
  }
}

// Training mode. A summary (count, mean, M2) of a batch of values is merged into a running one with Chan et
// al.'s formula: no sum of squares, so the variance survives a mean far larger than the spread, and the
// pieces of a channel merge in float64.
template <typename acc_t> struct Summary { acc_t n, mean, m2; };

// w = b.n / (a.n + b.n), given: summaries of equal counts (a thread's channels) share it.
template <typename acc_t>
__device__ __forceinline__ Summary<acc_t> merge(const Summary<acc_t>& a, const Summary<acc_t>& b, acc_t w) {
  const acc_t delta = b.mean - a.mean;
  return {a.n + b.n, a.mean + delta * w, a.m2 + b.m2 + delta * delta * a.n * w};
}

template <typename acc_t>
__device__ __forceinline__ Summary<acc_t> merge(const Summary<acc_t>& a, const Summary<acc_t>& b) {
  const acc_t n = a.n + b.n;
  return merge(a, b, n > acc_t(0) ? b.n / n : acc_t(0));
}

// The summary of the first k of K values (k > 0), two passes over registers; `inverse` is 1 / k.
template <typename acc_t, int K>
__device__ __forceinline__ Summary<acc_t> summarize(const acc_t (&v)[K], int k, acc_t inverse) {
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (i < k) sum += v[i];
  const acc_t mean = sum * inverse;
  acc_t m2 = 0;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (i < k) m2 += (v[i] - mean) * (v[i] - mean);
  return {acc_t(k), mean, m2};
}

template <typename acc_t, int K>
__device__ __forceinline__ Summary<acc_t> summarize(const acc_t (&v)[K], int k) {
  return summarize(v, k, acc_t(1) / acc_t(k));
}

constexpr int STATS_THREADS = 256;
// Blocks of the statistics kernels resident on an SM (their register budget is set for it): the grid is one
// wave of them, so that every thread loops over many rows and the block's closing reduction is paid once.
constexpr int STATS_BLOCKS_PER_SM = 2;

// A block's summaries, `width` columns by `height` rows (a power of two) in `table`, merged down the rows
// into row 0; thread (x, y) wrote column x of row y.
template <typename acc_t>
__device__ void merge_rows(Summary<acc_t>* table, int width, int height) {
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  for (int half = height / 2; half > 0; half /= 2) {
    __syncthreads();
    for (int k = thread; k < half * width; k += blockDim.x * blockDim.y) table[k] = merge(table[k], table[k + half * width]);
  }
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ void store_part(double* summary, int64_t stride, int64_t at, const Summary<acc_t>& s) {
  summary[at] = s.n;
  summary[stride + at] = s.mean;
  summary[2 * stride + at] = s.m2;
}

// Contiguous NCHW: channel c is N planes of `plane_vecs` vectors; block (c, part) summarises vectors
// [part * chunk, (part + 1) * chunk) of the channel's N * plane_vecs, threads striding through them with
// UNROLL loads in flight.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(STATS_THREADS, STATS_BLOCKS_PER_SM) nchw_stats_kernel(const scalar_t* __restrict__ x, double* __restrict__ summary,
                                  int64_t batch, int64_t channels, int64_t plane_vecs, FastDiv plane_div, int64_t parts,
                                  int64_t chunk) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t c = blockIdx.x / parts, part = blockIdx.x % parts;
  const int64_t units = batch * plane_vecs;
  const int64_t end = min(units, (part + 1) * chunk);
  const bool narrow = units < (int64_t(1) << 31);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  Summary<acc_t> s{0, 0, 0};
  for (int64_t base = part * chunk + threadIdx.x; base < end; base += int64_t(blockDim.x) * UNROLL) {
    vec_t in[UNROLL];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = base + u * blockDim.x;
      if (i < end) {
        const int64_t n = narrow ? int64_t(plane_div(uint32_t(i))) : i / plane_vecs;
        in[u] = xv[(n * channels + c) * plane_vecs + (i - n * plane_vecs)];
        ++valid;
      }
    }
    acc_t v[UNROLL * VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[u * VEC + j] = to_acc(in[u].v[j]);
    s = merge(s, summarize(v, valid * VEC));
  }
  Summary<acc_t>* table = reinterpret_cast<Summary<acc_t>*>(shared_table);
  table[threadIdx.x] = s;
  merge_rows(table, 1, blockDim.x);
  if (threadIdx.x == 0) store_part(summary, parts * channels, part * channels + c, table[0]);
}

// NHWC: thread (tx, ty) of block (bx, by) owns channels c0 .. c0 + VEC - 1 as channels_last_kernel does, and
// visits rows by * blockDim.y + ty, then every gridDim.y * blockDim.y-th; row by of the summary is block
// row by's piece. So this grid of one wave reads x in address order, and channels_last_kernel, which starts
// at the end, finds the rows read last in L2 (experiments/NOTES.md, "channels_last: a block's loads in
// consecutive rows, from the tensor's end"). A thread's channels see the same number of values, so one
// division per step serves all VEC of them, and the loads are made unconditionally (clamped to the last row),
// as in channels_last_kernel.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(STATS_THREADS, STATS_BLOCKS_PER_SM) channels_last_stats_kernel(const scalar_t* __restrict__ x,
                                           double* __restrict__ summary, int64_t rows, int64_t channels) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  const scalar_t* column = x + min(c0, channels - VEC);
  Summary<acc_t> s[VEC] = {};
  for (int64_t base = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; c0 < channels && base < rows; base += step * UNROLL) {
    vec_t in[UNROLL];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      in[u] = *reinterpret_cast<const vec_t*>(column + min(base + u * step, rows - 1) * channels);
      valid += base + u * step < rows;
    }
    const acc_t inverse = acc_t(1) / acc_t(valid), w = acc_t(valid) / (s[0].n + acc_t(valid));
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) v[u] = to_acc(in[u].v[j]);
      s[j] = merge(s[j], summarize(v, valid, inverse), w);
    }
  }
  Summary<acc_t>* table = reinterpret_cast<Summary<acc_t>*>(shared_table);
  const int width = blockDim.x * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) table[threadIdx.y * width + threadIdx.x * VEC + j] = s[j];
  merge_rows(table, width, blockDim.y);
  const int64_t parts = gridDim.y;
  for (int k = threadIdx.y * blockDim.x + threadIdx.x; k < width; k += blockDim.x * blockDim.y) {
    const int64_t c = int64_t(blockIdx.x) * width + k;
    if (c < channels) store_part(summary, parts * channels, blockIdx.y * channels + c, table[k]);
  }
}

// The sum of v over the warp, for every lane.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// A channel's running statistics (float32 or the input's dtype), loaded apart from their update so that a
// kernel can issue the loads early and end on stores.
struct Running { double mean, var; };

template <typename scalar_t>
__device__ __forceinline__ Running load_running(const void* running_mean, const void* running_var, bool fp32,
                                                int64_t c) {
  return {load_param<scalar_t, double>(running_mean, fp32, c), load_param<scalar_t, double>(running_var, fp32, c)};
}

// As PyTorch does: the running statistics `old` move towards the batch's, the variance with Bessel's correction.
template <typename scalar_t>
__device__ __forceinline__ void store_running(void* running_mean, void* running_var, bool fp32, int64_t c,
                                              const Running& old, const Summary<double>& s, double momentum) {
  const double mean = (1 - momentum) * old.mean + momentum * s.mean;
  const double var = (1 - momentum) * old.var + momentum * (s.m2 / max(s.n - 1, 1.0));
  if (fp32) {
    static_cast<float*>(running_mean)[c] = float(mean);
    static_cast<float*>(running_var)[c] = float(var);
  } else {
    using acc_t = typename Acc<scalar_t>::type;
    from_acc(acc_t(mean), static_cast<scalar_t*>(running_mean)[c]);
    from_acc(acc_t(var), static_cast<scalar_t*>(running_var)[c]);
  }
}

// Both in turn, where nothing is gained by loading early.
template <typename scalar_t>
__device__ __forceinline__ void update_running(void* running_mean, void* running_var, bool fp32, int64_t c,
                                               const Summary<double>& s, double momentum) {
  store_running<scalar_t>(running_mean, running_var, fp32, c,
                          load_running<scalar_t>(running_mean, running_var, fp32, c), s, momentum);
}

// A warp per channel merges the channel's `parts` pieces, writes the batch mean and biased variance, and
// updates the running statistics (when given). The merge is by sums alone, as block_summary's: the mean from
// the counts and count-weighted means, then M2 from each piece's M2 and its spread around that mean (a merge
// tree divides at every step, and a float64 division takes hundreds of cycles).
template <typename scalar_t>
__global__ void finalize_stats_kernel(const double* __restrict__ summary, int64_t parts, int64_t channels,
                                      typename Acc<scalar_t>::type* mean, typename Acc<scalar_t>::type* var,
                                      void* running_mean, void* running_var, bool running_fp32, double momentum) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;
  // Piece p of channel c: count n[p * channels], mean means[...], M2 m2s[...].
  const double* n = summary + c;
  const double* means = n + parts * channels;
  const double* m2s = means + parts * channels;
  double count = 0, weighted = 0, m2 = 0;
  for (int64_t p = lane; p < parts; p += 32) {
    count += n[p * channels];
    weighted += n[p * channels] * means[p * channels];
  }
  count = warp_sum(count);
  const double average = warp_sum(weighted) / max(count, 1.0);
  for (int64_t p = lane; p < parts; p += 32) {
    const double d = means[p * channels] - average;
    m2 += m2s[p * channels] + n[p * channels] * d * d;
  }
  const Summary<double> s{count, average, warp_sum(m2)};
  if (lane != 0) return;
  mean[c] = s.mean;
  var[c] = s.m2 / s.n;
  if (running_mean != nullptr) update_running<scalar_t>(running_mean, running_var, running_fp32, c, s, momentum);
}

// Training mode reading x from device memory once (NCHW). A persistent grid, all of it resident (a cooperative
// launch), takes the channels one at a time. Each block owns a share of the channel (FUSED_THREADS-vector
// slots) and summarises it while keeping it on chip: HELD slots in registers, up to `shared_slots` in shared
// memory (copied there by cp.async); the rest, where the chip holds less than a channel, is read last, so
// that the normalisation can read it again first, from L2. Then the grid synchronises, every block merges
// the blocks' summaries of the channel, and writes its share normalised, loading the next channel's share
// into the registers and shared memory as they are written out. One barrier per channel: the rule in
// read_once() keeps this kernel to channels large enough to pay for it.
constexpr int FUSED_THREADS = 384;
constexpr int HELD = 16;

// The sum of v over the block, for every thread; `scratch` holds one double per warp.
__device__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) v += scratch[w];
  __syncthreads();  // scratch is free again
  return v;
}

// The block's summaries merged, for every thread, by sums alone: the mean from the counts and count-weighted
// means, then M2 as the sum of each summary's M2 and its spread around that mean. No division but one (a
// merge tree divides at every level, and a float64 division takes hundreds of cycles).
__device__ Summary<double> block_summary(const Summary<double>& s, double* scratch) {
  const double n = block_sum(s.n, scratch);
  const double mean = block_sum(s.n * s.mean, scratch) / max(n, 1.0);
  const double d = s.mean - mean;
  return {n, mean, block_sum(s.m2 + s.n * d * d, scratch)};
}

// Accesses to data touched for the last time, which L2 may evict first (so the part of a channel that is read
// twice stays in L2 in between).
__device__ __forceinline__ Vec<float, 4> load_last(const Vec<float, 4>* p) {
  const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
  return {{v.x, v.y, v.z, v.w}};
}

__device__ __forceinline__ void store_last(Vec<float, 4>* p, const Vec<float, 4>& v) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v.v[0], v.v[1], v.v[2], v.v[3]));
}

template <typename scalar_t, int VEC, int K>
__device__ __forceinline__ Summary<typename Acc<scalar_t>::type> summarize_vectors(const Vec<scalar_t, VEC>* in,
                                                                                    int valid) {
  typename Acc<scalar_t>::type v[K * VEC];
#pragma unroll
  for (int u = 0; u < K; ++u)
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[u * VEC + j] = to_acc(in[u].v[j]);
  return summarize(v, valid * VEC);
}

template <typename scalar_t>
__global__ void __launch_bounds__(FUSED_THREADS, 1) fused_nchw_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p, int64_t batch, int64_t channels,
    int64_t plane_vecs, FastDiv plane_div, int shared_slots, double* __restrict__ summary, void* running_mean,
    void* running_var, bool running_fp32, double momentum) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[FUSED_THREADS / 32];
  __shared__ Affine<acc_t> channel;
  vec_t* stash = reinterpret_cast<vec_t*>(shared_table);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  vec_t* yv = reinterpret_cast<vec_t*>(y);
  const int64_t units = batch * plane_vecs;
  const int64_t share = (units + gridDim.x - 1) / gridDim.x;
  const int64_t begin = blockIdx.x * share;
  const int count = int(max(min(units - begin, share), int64_t(0)));
  const int slots = (count + blockDim.x - 1) / blockDim.x;
  const int streamed = HELD + shared_slots;
  const int64_t parts = gridDim.x;
  auto valid = [&](int slot) { return slot * int(blockDim.x) + int(threadIdx.x) < count; };
  auto valid_of = [&](int slot) {  // of slots slot .. slot + UNROLL - 1
    int n = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) n += valid(slot + u);
    return n;
  };
  auto channel_summary = [&](int64_t c) {  // the channel's block summaries merged, a thread per summary
    Summary<double> t{0, 0, 0};
    for (int64_t q = threadIdx.x; q < parts; q += blockDim.x) {
      const int64_t i = c * parts + q;
      t = merge(t, Summary<double>{summary[i], summary[parts * channels + i], summary[2 * parts * channels + i]});
    }
    return block_summary(t, scratch);
  };
  auto at = [&](int64_t c, int slot) {  // the vector offset of this thread's slot of channel c in x and y
    const uint32_t i = uint32_t(begin + slot * blockDim.x + threadIdx.x);
    const uint32_t n = plane_div(i);
    return (int64_t(n) * channels + c) * plane_vecs + (i - n * plane_vecs);
  };
  // The part of channel c kept on chip is requested in one go: the shared-memory slots (copied without
  // passing through registers, all in flight at once) and the register slots. Channel 0's here; each next
  // channel's as the previous one's stores free the space.
  vec_t held[HELD];
  auto load_held = [&](int64_t c) {
#pragma unroll
    for (int k = 0; k < HELD; ++k)
      if (valid(k)) held[k] = load_last(xv + at(c, k));
  };
  auto load_stash = [&](int64_t c) {
    for (int k = HELD; k < min(streamed, slots); ++k)
      if (valid(k)) __pipeline_memcpy_async(stash + (k - HELD) * blockDim.x + threadIdx.x, xv + at(c, k), sizeof(vec_t));
    __pipeline_commit();
  };
  if (channels > 0) {
    load_stash(0);
    load_held(0);
  }
  for (int64_t c = 0; c < channels; ++c) {
    const Affine<acc_t> wb = weight_bias<scalar_t, acc_t>(p, c);  // in flight while x is summarised
    Summary<acc_t> s{0, 0, 0};
#pragma unroll
    for (int k = 0; k < HELD; k += UNROLL)
      if (valid(k)) s = merge(s, summarize_vectors<scalar_t, VEC, UNROLL>(held + k, valid_of(k)));
    for (int k = streamed; k < slots; k += UNROLL) {  // the rest, read last so that L2 still has it below
      vec_t in[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (valid(k + u)) in[u] = xv[at(c, k + u)];
      if (valid(k)) s = merge(s, summarize_vectors<scalar_t, VEC, UNROLL>(in, valid_of(k)));
    }
    __pipeline_wait_prior(0);
    for (int k = HELD; k < min(streamed, slots); k += UNROLL) {
      vec_t in[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) in[u] = stash[(k - HELD + u) * blockDim.x + threadIdx.x];
      if (valid(k)) s = merge(s, summarize_vectors<scalar_t, VEC, UNROLL>(in, valid_of(k)));
    }
    const Summary<double> b = block_summary(Summary<double>{s.n, s.mean, s.m2}, scratch);
    if (threadIdx.x == 0) store_part(summary, parts * channels, c * parts + blockIdx.x, b);
    cooperative_groups::this_grid().sync();
    const Summary<double> t = channel_summary(c);  // every block merges the channel's block summaries
    if (threadIdx.x == 0) channel = affine_of(wb, acc_t(t.mean), acc_t(t.m2 / t.n), p.eps);
    __syncthreads();
    const Affine<acc_t> a = channel;
    auto normalized = [&](const vec_t& in) {
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = apply(in.v[j], a);
      return out;
    };
    for (int k = streamed; k < slots; k += UNROLL) {  // read again, first, while it is in L2
      vec_t in[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (valid(k + u)) in[u] = load_last(xv + at(c, k + u));
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (valid(k + u)) store_last(yv + at(c, k + u), normalized(in[u]));
    }
    // As each part's stores are issued, the next channel's loads into the same registers and shared memory
    // follow, so device memory reads the next channel while it writes this one (as a copy does) instead of
    // a read-only phase and a write-only one.
    const bool next = c + 1 < channels;
#pragma unroll
    for (int k = 0; k < HELD; ++k)
      if (valid(k)) store_last(yv + at(c, k), normalized(held[k]));
    if (next) load_held(c + 1);
    for (int k = HELD; k < min(streamed, slots); ++k)
      if (valid(k)) store_last(yv + at(c, k), normalized(stash[(k - HELD) * blockDim.x + threadIdx.x]));
    if (next) load_stash(c + 1);
  }
  // The running statistics after every channel, off the barriers' critical path (their loads and stores held
  // up one block per channel): block b takes channels b, b + gridDim.x, ..., from the block summaries each
  // channel left before its barrier.
  for (int64_t c = blockIdx.x; running_mean != nullptr && c < channels; c += gridDim.x) {
    const Summary<double> t = channel_summary(c);
    if (threadIdx.x == 0) update_running<scalar_t>(running_mean, running_var, running_fp32, c, t, momentum);
  }
}

// Training mode for a channel that fits in shared memory (NCHW): a block per channel reads it once into
// shared memory while summarising it, merges the summary, updates the running statistics and writes the
// channel normalised. One launch, x read once, no grid-wide barrier.
constexpr int CHANNEL_THREADS = 512;

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(CHANNEL_THREADS) channel_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p, int64_t channels, int units,
    int64_t plane_vecs, FastDiv plane_div, void* running_mean, void* running_var, bool running_fp32,
    double momentum) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[32];
  vec_t* stash = reinterpret_cast<vec_t*>(shared_table);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  vec_t* yv = reinterpret_cast<vec_t*>(y);
  const int64_t c = blockIdx.x;
  const Affine<acc_t> wb = weight_bias<scalar_t, acc_t>(p, c);  // in flight while x is summarised
  // So is thread 0's load of the running statistics: at the end, it would lengthen the block's tail.
  const bool updates = threadIdx.x == 0 && running_mean != nullptr;
  const Running old = updates ? load_running<scalar_t>(running_mean, running_var, running_fp32, c) : Running{0, 0};
  auto at = [&](int i) {  // the offset of the channel's i-th vector in x and y
    const uint32_t n = plane_div(uint32_t(i));
    return (int64_t(n) * channels + c) * plane_vecs + (i - int64_t(n) * plane_vecs);
  };
  Summary<acc_t> s{0, 0, 0};
  for (int base = threadIdx.x; base < units; base += blockDim.x * UNROLL) {
    vec_t in[UNROLL];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * blockDim.x;
      if (i < units) {
        in[u] = xv[at(i)];
        ++valid;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (u < valid) stash[base + u * blockDim.x] = in[u];
    s = merge(s, summarize_vectors<scalar_t, VEC, UNROLL>(in, valid));
  }
  // The channel's count is known: two block sums, not block_summary's three.
  const double n = double(units) * VEC, mean = block_sum(s.n * s.mean, scratch) / n, d = s.mean - mean;
  const Summary<double> t{n, mean, block_sum(s.m2 + s.n * d * d, scratch)};
  const Affine<acc_t> a = affine_of(wb, acc_t(t.mean), acc_t(t.m2 / t.n), p.eps);
  for (int i = threadIdx.x; i < units; i += blockDim.x) {
    vec_t out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = apply(stash[i].v[j], a);
    yv[at(i)] = out;
  }
  if (updates) store_running<scalar_t>(running_mean, running_var, running_fp32, c, old, t, momentum);
}

// The same for channels_last, where a channel is a column of the N * H * W rows: a block per group of
// GROUP_BYTES-wide columns (one 32-byte sector per row), thread t on column t % cols of every
// (blockDim.x / cols)-th row. The group stays in shared memory; mean, then the spread around it, are sums over
// the block of each column (two passes over shared memory, no merges).
constexpr int GROUP_BYTES = 32;

// Per-column sums over the block: thread t holds K values of column t % cols (cols a power of two, at most
// 32); every thread gets its column's sums. `scratch`: blockDim.x / 32 * cols * K doubles.
template <int K>
__device__ void column_sums(double (&v)[K], int cols, double* scratch) {
  for (int offset = 16; offset >= cols; offset /= 2)
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffff, v[k], offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane < cols)
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[(warp * cols + lane) * K + k] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w)
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += scratch[(w * cols + lane % cols) * K + k];
  __syncthreads();  // scratch is free again
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(CHANNEL_THREADS) channel_group_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p, int64_t channels, int rows, int cols,
    void* running_mean, void* running_var, bool running_fp32, double momentum) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[CHANNEL_THREADS / 32 * GROUP_BYTES / 2];  // cols * VEC <= 16 channels
  vec_t* stash = reinterpret_cast<vec_t*>(shared_table);
  const int col = threadIdx.x % cols, step = blockDim.x / cols;
  const int64_t c0 = (int64_t(blockIdx.x) * cols + col) * VEC;  // the thread's first channel
  const bool active = c0 < channels;  // channels is a multiple of VEC
  const vec_t* xv = reinterpret_cast<const vec_t*>(x) + c0 / VEC;
  vec_t* yv = reinterpret_cast<vec_t*>(y) + c0 / VEC;
  const int64_t row_vecs = channels / VEC;
  Affine<acc_t> wb[VEC];  // in flight while x is summarised (channel 0's, unused, past the last channel)
#pragma unroll
  for (int j = 0; j < VEC; ++j) wb[j] = weight_bias<scalar_t, acc_t>(p, active ? c0 + j : 0);
  // The thread on row j updates channel c0 + j's running statistics at the end; loaded now, so that no thread
  // ends on a load. (Its condition is tested again there, not kept in a flag: one more live predicate ran
  // sm_80 out of predicate registers and into local memory.)
  const Running old = active && running_mean != nullptr && threadIdx.x / cols < VEC
                          ? load_running<scalar_t>(running_mean, running_var, running_fp32, c0 + threadIdx.x / cols)
                          : Running{0, 0};
  double sum[VEC] = {};
  for (int base = threadIdx.x / cols; active && base < rows; base += step * UNROLL) {
    vec_t in[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (base + u * step < rows) in[u] = xv[(base + u * step) * row_vecs];
    acc_t part[VEC] = {};
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (base + u * step < rows) {
        stash[(base + u * step) * cols + col] = in[u];
#pragma unroll
        for (int j = 0; j < VEC; ++j) part[j] += to_acc(in[u].v[j]);
      }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum[j] += part[j];
  }
  column_sums(sum, cols, scratch);
  const double per_row = 1.0 / rows;  // one division: each has a branch to a slow path, which loads cannot cross
  acc_t mean[VEC];
  double m2[VEC] = {};
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = acc_t(sum[j] * per_row);
  for (int r = threadIdx.x / cols; active && r < rows; r += step) {
    const vec_t v = stash[r * cols + col];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t d = to_acc(v.v[j]) - mean[j];
      m2[j] += d * d;
    }
  }
  column_sums(m2, cols, scratch);
  if (!active) return;
  Affine<acc_t> a[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) a[j] = affine_of(wb[j], mean[j], acc_t(m2[j] * per_row), p.eps);
  for (int r = threadIdx.x / cols; r < rows; r += step) {
    const vec_t v = stash[r * cols + col];
    vec_t out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = apply(v.v[j], a[j]);
    yv[r * row_vecs] = out;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (threadIdx.x / cols == j && running_mean != nullptr)
      store_running<scalar_t>(running_mean, running_var, running_fp32, c0 + j, old,
                              Summary<double>{double(rows), sum[j] * per_row, m2[j]}, momentum);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int element_size(DType dtype) {
  return dtype == DType::Double ? 8 : dtype == DType::Float ? 4 : 2;
}

int64_t cap_blocks(int64_t blocks, int64_t max_blocks) {
  blocks = std::max<int64_t>(blocks, 1);
  return max_blocks > 0 ? std::min(blocks, max_blocks) : blocks;
}

int threads_or(const Launch& l, int fallback) { return l.threads ? l.threads : fallback; }

bool aligned(const void* p, size_t bytes = VEC_BYTES) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Threads along a row of `vectors` channel vectors: a power of two, at most a warp and at most `threads`.
int64_t row_threads(int64_t vectors, int64_t threads) {
  int64_t tx = 1;
  while (tx < vectors && tx < MAX_ROW_THREADS && tx < threads) tx *= 2;
  return tx;
}


// Dynamic shared memory beyond the default 48 KB must be asked for (big blocks on 2- to 5-element planes).
template <typename Kernel>
cudaError_t reserve_shared(Kernel kernel, size_t bytes) {
  return bytes <= 48 * 1024 ? cudaSuccess
                            : cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

template <typename scalar_t, int VEC, bool WHOLE, bool LONG>
cudaError_t nchw_launch(const Launch& l) {
  using acc_t = typename Acc<scalar_t>::type;
  const int threads = threads_or(l, DEFAULT_THREADS);
  const int64_t tile = int64_t(threads) * UNROLL * VEC;
  const int64_t blocks = cap_blocks(std::min<int64_t>(cdiv(l.numel, tile), INT32_MAX), l.max_blocks);
  // A tile of short planes touches at most tile / plane + 2 of them; one more entry is read (not used) past a
  // padded tail. Long planes use no table.
  const size_t shared = LONG ? 0 : size_t(tile / l.plane + 3) * sizeof(Affine<acc_t>);
  const auto kernel = nchw_kernel<scalar_t, VEC, WHOLE, LONG>;
  if (const cudaError_t error = reserve_shared(kernel, shared); error != cudaSuccess) return error;
  kernel<<<blocks, threads, shared, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, l.numel, l.plane,
      make_fast_div(uint32_t(std::min<int64_t>(l.plane, INT32_MAX))), l.channels, make_fast_div(uint32_t(l.channels)));
  return cudaGetLastError();
}

template <typename scalar_t, int VEC, bool STRADDLE>
cudaError_t small_launch(const Launch& l) {
  const int threads = threads_or(l, DEFAULT_THREADS);
  small_kernel<scalar_t, VEC, STRADDLE><<<cdiv(cdiv(l.numel, VEC), threads), threads, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, uint32_t(l.numel),
      uint32_t(l.plane), make_fast_div(uint32_t(l.plane)), uint32_t(l.channels), make_fast_div(uint32_t(l.channels)));
  return cudaGetLastError();
}

// A small-tensor kernel for tensors of at most `limit` bytes, or as the launch asks; their indices are 32-bit.
bool small(const Launch& l, int64_t limit) {
  if (l.small == 0 || l.numel >= (int64_t(1) << 31)) return false;
  return l.small == 1 || (l.max_blocks == 0 && l.numel * element_size(l.dtype) <= limit);
}

template <typename scalar_t, int VEC, bool WHOLE>
cudaError_t nchw_by_size(const Launch& l) {
  // The small kernel computes a pair per vector, two where a vector straddles planes (which need to be at
  // least a vector long). Single elements, and 16-bit vectors that straddle (two pairs for eight elements),
  // cost more than the tiled kernel's table above SMALL_NARROW_BYTES; the rest, above SMALL_BYTES.
  constexpr bool narrow = VEC == 1 || (!WHOLE && sizeof(scalar_t) == 2);
  if ((WHOLE || l.plane >= VEC) && small(l, narrow ? SMALL_NARROW_BYTES : SMALL_BYTES))
    return small_launch<scalar_t, VEC, !WHOLE>(l);
  const bool long_planes = l.plane >= int64_t(threads_or(l, DEFAULT_THREADS)) * UNROLL * VEC;
  return long_planes ? nchw_launch<scalar_t, VEC, WHOLE, true>(l) : nchw_launch<scalar_t, VEC, WHOLE, false>(l);
}

// The NCHW kernel for a launch: vector width by alignment; the widest vector a plane is a whole number of (16
// bytes, else 8: 14x14 planes of a 16-bit type), straddling vectors only where a plane is neither (7x7); the
// small-tensor kernel for small tensors, else the tiled kernel, its shared-memory table only for planes
// shorter than a tile.
template <typename scalar_t>
cudaError_t nchw_typed(const Launch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  if (!l.vectorized || !aligned(l.x) || !aligned(l.y)) return nchw_by_size<scalar_t, 1, true>(l);
  if (l.plane % VEC == 0) return nchw_by_size<scalar_t, VEC, true>(l);
  if constexpr (VEC > 2) {
    if (l.plane % (VEC / 2) == 0) return nchw_by_size<scalar_t, VEC / 2, true>(l);
  }
  return nchw_by_size<scalar_t, VEC, false>(l);
}

template <typename scalar_t, int VEC>
cudaError_t channels_last_launch(const Launch& l) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t rows = l.numel / l.channels;
  const int64_t vectors = cdiv(l.channels, VEC);
  const int threads = std::min(threads_or(l, DEFAULT_THREADS), CHANNELS_LAST_MAX_THREADS);
  const int64_t tx = row_threads(vectors, threads);
  const int64_t ty = std::max<int64_t>(threads / tx, 1);
  const int64_t gx = cdiv(vectors, tx);
  const int64_t gy = cap_blocks(std::min<int64_t>(cdiv(rows, ty * UNROLL), 65535), l.max_blocks > 0 ? cdiv(l.max_blocks, gx) : 0);
  const size_t shared = size_t(tx * VEC) * sizeof(Affine<acc_t>);
  channels_last_kernel<scalar_t, VEC><<<dim3(gx, gy), dim3(tx, ty), shared, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, rows, l.channels);
  return cudaGetLastError();
}

template <typename scalar_t, int VEC, int ROWS = VEC == 1 ? 1 : SMALL_CHANNELS_LAST_ROWS>
cudaError_t small_channels_last_launch(const Launch& l) {
  const int64_t vectors = l.channels / VEC, units = vectors * cdiv(l.numel / l.channels, ROWS);
  const int threads = threads_or(l, SMALL_CHANNELS_LAST_THREADS);
  small_channels_last_kernel<scalar_t, VEC, ROWS><<<cdiv(units, threads), threads, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, uint32_t(l.numel / l.channels),
      uint32_t(vectors), make_fast_div(uint32_t(vectors)));
  return cudaGetLastError();
}

// Every parameter vector aligned for VEC-wide loads.
template <typename scalar_t, int VEC>
bool params_aligned(const Params& p) {
  const size_t affine = VEC * (p.affine_fp32 ? sizeof(float) : sizeof(scalar_t));
  const size_t stats = VEC * (p.stats_fp32 ? sizeof(float) : sizeof(scalar_t));
  return aligned(p.weight, affine) && aligned(p.bias, affine) && aligned(p.mean, stats) && aligned(p.var, stats);
}

// The channels_last kernel for a launch: the small-tensor kernel for small tensors whose parameters allow its
// vector loads, 16-bit ones of at most SMALL_NARROW_BYTES on half vectors of two rows; else the block kernel.
template <typename scalar_t, int VEC>
cudaError_t channels_last_by_size(const Launch& l) {
  if (!params_aligned<scalar_t, VEC>(l.params) || !small(l, SMALL_BYTES))
    return channels_last_launch<scalar_t, VEC>(l);
  if constexpr (sizeof(scalar_t) == 2 && VEC > 1) {
    if (l.numel * int64_t(sizeof(scalar_t)) <= SMALL_NARROW_BYTES)
      return small_channels_last_launch<scalar_t, VEC / 2, 2>(l);
  }
  return small_channels_last_launch<scalar_t, VEC>(l);
}

template <typename scalar_t>
cudaError_t channels_last_typed(const Launch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  const bool vectorized = l.vectorized && aligned(l.x) && aligned(l.y) && l.channels % VEC == 0;
  return vectorized ? channels_last_by_size<scalar_t, VEC>(l) : channels_last_by_size<scalar_t, 1>(l);
}

template <typename scalar_t>
cudaError_t naive_typed(const Launch& l) {
  const int numel = int(l.numel);
  naive_kernel<scalar_t><<<(numel + 255) / 256, 256, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, numel, int(l.plane), int(l.channels));
  return cudaGetLastError();
}

// The statistics kernels' grid: STATS_BLOCKS_PER_SM blocks per SM, so the whole tensor is read in one wave,
// each block summarising one piece of its channels.
struct StatsGrid {
  int vec;
  int64_t tx, ty, gx, parts, chunk;
};

int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&value, attribute, device);
  return value;
}

int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

StatsGrid stats_grid(const StatsLaunch& l) {
  const int64_t blocks = int64_t(sm_count()) * STATS_BLOCKS_PER_SM;
  const int full = VEC_BYTES / element_size(l.dtype);
  if (!l.channels_last) {
    const int vec = l.vectorized && aligned(l.x) && l.plane % full == 0 ? full : 1;
    const int64_t units = l.numel / l.channels / vec;
    const int64_t parts = std::max<int64_t>(std::min(cdiv(blocks, l.channels), cdiv(units, STATS_THREADS * UNROLL)), 1);
    return {vec, STATS_THREADS, 1, l.channels, parts, cdiv(units, parts)};
  }
  const int vec = l.vectorized && aligned(l.x) && l.channels % full == 0 ? full : 1;
  const int64_t tx = row_threads(cdiv(l.channels, vec), STATS_THREADS), ty = STATS_THREADS / tx;
  const int64_t gx = cdiv(cdiv(l.channels, vec), tx);
  const int64_t rows = l.numel / l.channels;
  const int64_t parts = std::max<int64_t>(std::min({cdiv(blocks, gx), cdiv(rows, ty * UNROLL), int64_t(65535)}), 1);
  return {vec, tx, ty, gx, parts, 0};
}

template <typename scalar_t, int VEC>
cudaError_t stats_kernel_launch(const StatsLaunch& l, const StatsGrid& g) {
  using acc_t = typename Acc<scalar_t>::type;
  const size_t shared = size_t(STATS_THREADS) * VEC * sizeof(Summary<acc_t>);
  if (l.channels_last) {
    channels_last_stats_kernel<scalar_t, VEC><<<dim3(g.gx, g.parts), dim3(g.tx, g.ty), shared, l.stream>>>(
        static_cast<const scalar_t*>(l.x), l.summary, l.numel / l.channels, l.channels);
  } else {
    const int64_t plane_vecs = l.plane / VEC, batch = l.numel / l.channels / l.plane;
    nchw_stats_kernel<scalar_t, VEC><<<g.gx * g.parts, STATS_THREADS, shared, l.stream>>>(
        static_cast<const scalar_t*>(l.x), l.summary, batch, l.channels, plane_vecs,
        make_fast_div(uint32_t(std::min<int64_t>(plane_vecs, INT32_MAX))), g.parts, g.chunk);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t finalize_launch(const StatsLaunch& l, int64_t parts) {
  using acc_t = typename Acc<scalar_t>::type;
  finalize_stats_kernel<scalar_t><<<cdiv(l.channels * 32, 256), 256, 0, l.stream>>>(
      l.summary, parts, l.channels, static_cast<acc_t*>(l.mean), static_cast<acc_t*>(l.var), l.running_mean,
      l.running_var, l.running_fp32, l.momentum);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t stats_typed(const StatsLaunch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  const StatsGrid g = stats_grid(l);
  const cudaError_t error = g.vec == VEC ? stats_kernel_launch<scalar_t, VEC>(l, g) : stats_kernel_launch<scalar_t, 1>(l, g);
  if (error != cudaSuccess) return error;
  return finalize_launch<scalar_t>(l, g.parts);
}

// One block per SM, each with all the shared memory a block may have, less what the kernel declares itself.
template <typename scalar_t>
cudaError_t fused_typed(const StatsLaunch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  const auto kernel = fused_nchw_kernel<scalar_t>;
  const int64_t blocks = sm_count(), plane_vecs = l.plane / VEC, batch = l.numel / l.channels / l.plane;
  const int64_t slots = cdiv(cdiv(batch * plane_vecs, blocks), FUSED_THREADS);
  const int64_t room = (device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) - 1024) / (FUSED_THREADS * VEC_BYTES);
  const int shared_slots = int(std::min(cdiv(std::max<int64_t>(slots - HELD, 0), UNROLL), room / UNROLL) * UNROLL);
  const size_t shared = size_t(shared_slots) * FUSED_THREADS * VEC_BYTES;
  if (const cudaError_t error = reserve_shared(kernel, shared); error != cudaSuccess) return error;
  const scalar_t* x = static_cast<const scalar_t*>(l.x);
  scalar_t* y = static_cast<scalar_t*>(l.y);
  int64_t channels = l.channels;
  FastDiv plane_div = make_fast_div(uint32_t(plane_vecs));
  bool running_fp32 = l.running_fp32;
  double momentum = l.momentum;
  void* running_mean = l.running_mean;
  void* running_var = l.running_var;
  double* summary = l.summary;
  Params params = l.params;
  int shared_slots_arg = shared_slots;
  int64_t batch_arg = batch, plane_vecs_arg = plane_vecs;
  void* args[] = {&x, &y, &params, &batch_arg, &channels, &plane_vecs_arg, &plane_div, &shared_slots_arg, &summary,
                  &running_mean, &running_var, &running_fp32, &momentum};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(FUSED_THREADS), args,
                                     shared, l.stream);
}

// A block per channel loads, merges and stores in turn, so waves of blocks add up: the largest block of
// CHANNEL_THREADS, half or a quarter of it that still puts every channel on the GPU at once (as many blocks
// per SM as registers and shared memory allow), else the smallest.
template <typename Kernel>
int channel_threads(Kernel kernel, size_t shared, int64_t channels) {
  int threads = CHANNEL_THREADS;
  for (int blocks = 0; threads > CHANNEL_THREADS / 4; threads /= 2) {
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared);
    if (int64_t(blocks) * sm_count() >= channels) break;
  }
  return threads;
}

template <typename scalar_t, int VEC>
cudaError_t channel_launch(const StatsLaunch& l) {
  const int64_t plane_vecs = l.plane / VEC, units = l.numel / l.channels / VEC;
  const size_t shared = size_t(units) * sizeof(Vec<scalar_t, VEC>);
  if (int64_t(shared) > device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) - 1024) return cudaErrorInvalidValue;
  const auto kernel = channel_kernel<scalar_t, VEC>;
  if (const cudaError_t error = reserve_shared(kernel, shared); error != cudaSuccess) return error;
  kernel<<<l.channels, channel_threads(kernel, shared, l.channels), shared, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, l.channels, int(units), plane_vecs,
      make_fast_div(uint32_t(plane_vecs)), l.running_mean, l.running_var, l.running_fp32, l.momentum);
  return cudaGetLastError();
}

// The whole channel in the widest vectors x, y and the planes allow: 16 bytes, else 8 (14x14 planes of a
// 16-bit type), else single elements.
template <typename scalar_t>
cudaError_t channel_typed(const StatsLaunch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  const auto fits = [&](int vec) {
    return aligned(l.x, vec * sizeof(scalar_t)) && aligned(l.y, vec * sizeof(scalar_t)) && l.plane % vec == 0;
  };
  if (fits(VEC)) return channel_launch<scalar_t, VEC>(l);
  if constexpr (VEC > 2) {
    if (fits(VEC / 2)) return channel_launch<scalar_t, VEC / 2>(l);
  }
  return channel_launch<scalar_t, 1>(l);
}

template <typename scalar_t, int VEC>
cudaError_t channel_group_launch(const StatsLaunch& l) {
  const int64_t rows = l.numel / l.channels;
  const int cols = GROUP_BYTES / int(sizeof(scalar_t)) / VEC;
  const size_t shared = size_t(rows) * GROUP_BYTES;
  if (int64_t(shared) > device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) - 1024) return cudaErrorInvalidValue;
  const auto kernel = channel_group_kernel<scalar_t, VEC>;
  if (const cudaError_t error = reserve_shared(kernel, shared); error != cudaSuccess) return error;
  const int64_t groups = cdiv(l.channels, int64_t(cols) * VEC);
  kernel<<<groups, channel_threads(kernel, shared, groups), shared, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, l.channels, int(rows), cols,
      l.running_mean, l.running_var, l.running_fp32, l.momentum);
  return cudaGetLastError();
}

// 16-byte vectors where x, y and the channel count allow, else single elements.
template <typename scalar_t>
cudaError_t channel_group_typed(const StatsLaunch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  const bool vectorized = aligned(l.x) && aligned(l.y) && l.channels % VEC == 0;
  return vectorized ? channel_group_launch<scalar_t, VEC>(l) : channel_group_launch<scalar_t, 1>(l);
}

#define BN2D_DISPATCH(dtype, fn, l)                        \
  switch (dtype) {                                       \
    case DType::Float: return fn<float>(l);              \
    case DType::Half: return fn<__half>(l);              \
    case DType::BFloat16: return fn<__nv_bfloat16>(l);   \
    case DType::Double: return fn<double>(l);            \
  }                                                      \
  return cudaErrorInvalidValue

}  // namespace

cudaError_t launch_nchw(const Launch& l) { BN2D_DISPATCH(l.dtype, nchw_typed, l); }
cudaError_t launch_channels_last(const Launch& l) { BN2D_DISPATCH(l.dtype, channels_last_typed, l); }
cudaError_t launch_naive(const Launch& l) { BN2D_DISPATCH(l.dtype, naive_typed, l); }
int64_t stats_parts(const StatsLaunch& l) {
  return l.fused == Fused::Grid ? sm_count() : l.fused == Fused::Channel ? 0 : stats_grid(l).parts;
}
cudaError_t launch_stats(const StatsLaunch& l) {
  // The fused kernel is built for float32 only: with 16-bit or float64 vectors it spills registers.
  if (l.fused == Fused::Grid) return l.dtype == DType::Float ? fused_typed<float>(l) : cudaErrorInvalidValue;
  if (l.fused == Fused::Channel && l.channels_last) {
    BN2D_DISPATCH(l.dtype, channel_group_typed, l);
  }
  if (l.fused == Fused::Channel) {
    BN2D_DISPATCH(l.dtype, channel_typed, l);
  }
  BN2D_DISPATCH(l.dtype, stats_typed, l);
}

}  // namespace bn2d
"""

# The tensor-facing side: checks, dtype, the current stream and device, and the bound functions.
CPP_SOURCE = COMMON + r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

namespace {

// Errors are returned to Python, which raises them, instead of thrown: under PyTorch 2.11 a c10::Error
// thrown through this module crashed the process (experiments/NOTES.md). An empty string means success.
#define BN2D_REQUIRE(cond, msg) \
  do {                          \
    if (!(cond)) return std::string("bn2d: ") + (msg); \
  } while (0)

std::string check_pair(const at::Tensor& x, const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b) {
  for (const auto* t : {&a, &b}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    BN2D_REQUIRE(v.scalar_type() == at::kFloat || v.scalar_type() == x.scalar_type(),
                 "per-channel tensors must be float32 or the input's dtype");
    BN2D_REQUIRE(v.is_contiguous() && v.dim() == 1 && v.numel() == x.size(1) && v.device() == x.device(),
                 "per-channel tensors must be contiguous, one value per channel, on the input's device");
  }
  BN2D_REQUIRE(!a.has_value() || !b.has_value() || a->scalar_type() == b->scalar_type(),
               "weight and bias (and mean and var) must share one dtype");
  return "";
}

// The input and the output (pass x twice when there is none).
std::string check_io(const at::Tensor& x, const at::Tensor& y) {
  BN2D_REQUIRE(x.is_cuda() && x.dim() == 4, "the input must be a 4-D CUDA tensor");
  BN2D_REQUIRE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                   x.scalar_type() == at::kDouble, "the input must be float32, float16, bfloat16 or float64");
  BN2D_REQUIRE(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type() &&
                   y.device() == x.device(), "the output must have the input's shape, strides, dtype and device");
  BN2D_REQUIRE(x.size(1) <= INT32_MAX, "too many channels");
  return "";
}

std::string check(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                  int64_t threads) {
  if (auto error = check_io(x, y); !error.empty()) return error;
  BN2D_REQUIRE(threads == 0 || (threads >= 32 && threads <= 1024 && threads % 32 == 0),
               "threads per block must be 0 (the default) or a multiple of 32 in [32, 1024], got " +
                   std::to_string(threads));
  if (auto error = check_pair(x, weight, bias); !error.empty()) return error;
  return check_pair(x, mean, var);
}

bn2d::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return bn2d::DType::Half;
    case at::kBFloat16: return bn2d::DType::BFloat16;
    case at::kDouble: return bn2d::DType::Double;
    default: return bn2d::DType::Float;
  }
}

// The per-channel parameters. An absent weight or bias points at a present vector of its pair's dtype (Params
// explains why), or at `fallback` (float32, at least one value per channel) when neither is present.
bn2d::Params params_of(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& fallback, const void* mean, const void* var, bool stats_fp32, double eps) {
  const at::Tensor& stand_in = weight.has_value() ? *weight : bias.has_value() ? *bias : fallback;
  return {(weight.has_value() ? *weight : stand_in).data_ptr(), (bias.has_value() ? *bias : stand_in).data_ptr(),
          mean, var, weight.has_value(), bias.has_value(), stand_in.scalar_type() == at::kFloat, stats_fp32, eps};
}

std::string launch_error(cudaError_t error) {
  return error == cudaSuccess ? "" : std::string("bn2d: kernel launch failed: ") + cudaGetErrorString(error);
}

// Checks, then runs `launcher` on x's device and current stream.
std::string run(cudaError_t (*launcher)(const bn2d::Launch&), const at::Tensor& x, at::Tensor& y,
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                const at::Tensor& mean, const at::Tensor& var, double eps, int64_t threads, bool vectorized,
                int64_t max_blocks, int64_t small) {
  if (auto error = check(x, y, weight, bias, mean, var, threads); !error.empty()) return error;
  if (x.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  const bool stats_fp32 = mean.scalar_type() == at::kFloat;
  const bn2d::Launch launch{dtype_of(x), x.data_ptr(), y.data_ptr(),
                            params_of(weight, bias, mean, mean.data_ptr(), var.data_ptr(), stats_fp32, eps),
                            x.numel(), x.size(1), x.size(2) * x.size(3), int(threads),
                            vectorized, max_blocks, int(small),
                            c10::cuda::getCurrentCUDAStream().stream()};
  return launch_error(launcher(launch));
}

// Checks training mode's arguments, then runs `launch` (its other fields filled in from them) with its
// workspace, three doubles per channel per piece, on x's device and current stream.
std::string run_training(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                         const c10::optional<at::Tensor>& running_var, double momentum, bool channels_last,
                         bn2d::StatsLaunch& launch) {
  if (auto error = check_pair(x, running_mean, running_var); !error.empty()) return error;
  BN2D_REQUIRE(running_mean.has_value() == running_var.has_value(), "give both running statistics or neither");
  BN2D_REQUIRE(x.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
               "the input's memory layout does not match `channels_last`");
  BN2D_REQUIRE(x.numel() > x.size(1), "training needs more than one value per channel");
  const c10::cuda::CUDAGuard guard(x.device());
  launch.dtype = dtype_of(x);
  launch.x = x.data_ptr();
  launch.numel = x.numel();
  launch.channels = x.size(1);
  launch.plane = x.size(2) * x.size(3);
  launch.channels_last = channels_last || launch.plane == 1;  // 1x1 planes: NCHW is NHWC
  launch.vectorized = true;
  launch.running_mean = running_mean.has_value() ? running_mean->data_ptr() : nullptr;
  launch.running_var = running_var.has_value() ? running_var->data_ptr() : nullptr;
  launch.running_fp32 = running_mean.has_value() && running_mean->scalar_type() == at::kFloat;
  launch.momentum = momentum;
  launch.stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor summary = at::empty({3 * bn2d::stats_parts(launch) * x.size(1)}, x.options().dtype(at::kDouble));
  launch.summary = summary.data_ptr<double>();
  return launch_error(bn2d::launch_stats(launch));
}

}  // namespace

std::string nchw(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                 int64_t threads, bool vectorized, int64_t max_blocks, int64_t small) {
  BN2D_REQUIRE(x.is_contiguous(), "nchw expects a contiguous input");
  // 1x1 planes: NCHW and NHWC are the same memory, and the channels_last kernel is the one for it.
  const bool pixels = x.dim() == 4 && x.size(2) * x.size(3) == 1;
  return run(pixels ? bn2d::launch_channels_last : bn2d::launch_nchw, x, y, weight, bias, mean, var, eps, threads,
             vectorized, max_blocks, small);
}

std::string channels_last(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                          double eps, int64_t threads, bool vectorized, int64_t max_blocks, int64_t small) {
  BN2D_REQUIRE(x.is_contiguous(at::MemoryFormat::ChannelsLast), "channels_last expects a channels_last input");
  return run(bn2d::launch_channels_last, x, y, weight, bias, mean, var, eps, threads, vectorized, max_blocks,
             small);
}

std::string naive(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps) {
  BN2D_REQUIRE(x.is_contiguous(), "naive expects a contiguous input");
  BN2D_REQUIRE(x.numel() <= INT32_MAX, "the naive kernel indexes with 32-bit ints and cannot address " +
                                           std::to_string(x.numel()) + " elements (at most 2^31 - 1)");
  return run(bn2d::launch_naive, x, y, weight, bias, mean, var, eps, 256, false, 0, 0);
}

// Eval mode's hot path in one bound call, the output allocated here: the fewest arguments to convert from
// Python (a call's host time, not the GPU's, is what a small tensor costs). Contiguous NCHW or channels_last x,
// default launch parameters. Returns None whenever anything is off -- a failed check, another layout, an empty
// input, an input that needs a gradient, no statistics, a failed allocation or launch -- and the caller then
// takes the general path, which handles the case or says what is wrong.
at::Tensor eval_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mean,
                        const c10::optional<at::Tensor>& var, double eps) {
  if (!mean.has_value() || !var.has_value() || !x.is_cuda() || x.dim() != 4 || x.numel() == 0) return {};
  if (at::GradMode::is_enabled()) {
    for (const auto* t : {&weight, &bias, &mean, &var})
      if (t->has_value() && (*t)->requires_grad()) return {};
    if (x.requires_grad()) return {};
  }
  const bool contiguous = x.is_contiguous();
  if (!contiguous && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {};
  at::Tensor y;
  try {
    y = at::empty_like(x);  // x's strides (dense): contiguous or channels_last
  } catch (...) {  // out of memory: the general path allocates again and raises it
    return {};
  }
  const std::string error = contiguous ? nchw(x, y, weight, bias, *mean, *var, eps, 0, true, 0, -1)
                                       : channels_last(x, y, weight, bias, *mean, *var, eps, 0, true, 0, -1);
  return error.empty() ? y : at::Tensor();
}

// Training mode: the batch mean and biased variance of each channel of x into `mean` and `var` (float32,
// float64 for float64 input), and the running statistics updated in place (when given).
std::string batch_stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var,
                        const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                        double momentum, bool channels_last) {
  if (auto error = check_io(x, x); !error.empty()) return error;
  if (auto error = check_pair(x, mean, var); !error.empty()) return error;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  BN2D_REQUIRE(mean.scalar_type() == acc && var.scalar_type() == acc,
               "batch mean and variance must be float32 (float64 for float64 input)");
  bn2d::StatsLaunch launch{};
  launch.mean = mean.data_ptr();
  launch.var = var.data_ptr();
  return run_training(x, running_mean, running_var, momentum, channels_last, launch);
}

// Training mode in one kernel that reads x from device memory once: y normalised with the batch statistics,
// and the running statistics updated (when given). `per_channel`: a block per channel of contiguous NCHW, or
// per channel group of channels_last (the channel or group must fit in a block's shared memory); else the
// persistent grid (contiguous NCHW, float32, x and y 16-byte aligned, planes of whole 16-byte vectors, fewer
// than 2^31 vectors per channel).
std::string fused_training(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                           const c10::optional<at::Tensor>& running_var, double momentum, double eps,
                           bool per_channel) {
  if (auto error = check_io(x, y); !error.empty()) return error;
  if (auto error = check_pair(x, weight, bias); !error.empty()) return error;
  const bool channels_last = !x.is_contiguous();
  BN2D_REQUIRE(!channels_last || (per_channel && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
               "fused_training takes a contiguous (NCHW) input, or a channels_last one for a block per channel");
  BN2D_REQUIRE(per_channel || (x.scalar_type() == at::kFloat && x.size(2) * x.size(3) % 4 == 0 &&
                               x.numel() / x.size(1) / 4 <= INT32_MAX &&
                               reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                               reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0),
               "the persistent kernel needs float32, 16-byte aligned x and y, planes of whole 4-element vectors "
               "and fewer than 2^31 vectors per channel");
  bn2d::StatsLaunch launch{};
  launch.y = y.data_ptr();
  launch.params = params_of(weight, bias, x, nullptr, nullptr, x.scalar_type() == at::kFloat, eps);
  launch.fused = per_channel ? bn2d::Fused::Channel : bn2d::Fused::Grid;
  return run_training(x, running_mean, running_var, momentum, channels_last, launch);
}
"""

FUNCTIONS = ["nchw", "channels_last", "naive", "eval_forward", "batch_stats", "fused_training"]


class CudaConfig(NamedTuple):
    """Launch parameters of the CUDA kernels (the naive kernel has fixed ones)."""

    threads: int = 0  # threads per block, a multiple of 32 (channels_last's tiled kernel: at most 512); 0: the
                      # kernel's (256; small channels_last: 128)
    vectorized: bool = True  # 16-byte loads and stores where the pointers and sizes allow
    blocks_per_sm: int = 0  # 0: enough blocks to cover the tensor once; k: a grid-stride grid of k per SM
    fused: int = -1  # training: -1 one kernel reading x once where it pays, 0 never, 1 wherever one applies
    small: int = -1  # normalisation: the small-tensor kernels, -1 by size, 0 never, 1 wherever they apply


def arch_flags() -> list:
    """nvcc -gencode flags: none when TORCH_CUDA_ARCH_LIST is set (PyTorch then applies it), else sm_80 plus
    the GPUs present."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    archs = {(8, 0)}
    if torch.cuda.is_available():
        archs |= {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in sorted(archs)]


def build(verbose: bool = False):
    """Compile (or load from PyTorch's extension cache) the CUDA module and return it."""
    from torch.utils import cpp_extension  # imported here: it looks for a CUDA toolkit as it loads

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("bn2d: the CUDA backend needs a CUDA compiler; set CUDA_HOME to a CUDA toolkit")
    kwargs = {}
    if "no_implicit_headers" in cpp_extension.load_inline.__code__.co_varnames:  # PyTorch >= 2.5
        kwargs["no_implicit_headers"] = True
    return cpp_extension.load_inline(
        name="bn2d_cuda",
        cpp_sources=CPP_SOURCE,
        cuda_sources=CUDA_SOURCE,
        functions=FUNCTIONS,
        extra_cuda_cflags=["-O3", *arch_flags()],
        verbose=verbose,
        **kwargs,
    )


_module = None


def module():
    """The compiled module, built on first use."""
    global _module
    if _module is None:
        print("bn2d: building the CUDA module (first use; cached afterwards) ...", file=sys.stderr, flush=True)
        _module = build()
    return _module


def normalize(x, y, weight, bias, mean, var, eps: float, layout: str, config):
    """y = x * scale[c] + shift[c] for `layout` in ("nchw", "channels_last", "naive"); x and y share strides.
    `config` holds a CudaConfig's fields in order."""
    m = module()
    if layout == "naive":
        error = m.naive(x, y, weight, bias, mean, var, eps)
    else:
        threads, vectorized, blocks_per_sm, _, small = config
        max_blocks = blocks_per_sm * _sm_count(x.device) if blocks_per_sm else 0
        error = getattr(m, layout)(x, y, weight, bias, mean, var, eps, threads, bool(vectorized), max_blocks, small)
    _check(error)


def eval_forward(x, weight, bias, mean, var, eps: float):
    """Eval mode's hot path, one bound call: y for contiguous NCHW or channels_last CUDA x with the default
    launch, or None where anything is off (the general path then runs, or says what is wrong)."""
    return module().eval_forward(x, weight, bias, mean, var, eps)


def batch_stats(x, layout: str, running_mean, running_var, momentum: float):
    """Batch mean and biased variance per channel (float32; float64 for float64 input), and the running
    statistics updated in place as PyTorch does (when given)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.empty(x.size(1), device=x.device, dtype=acc)
    var = torch.empty_like(mean)
    error = module().batch_stats(x, mean, var, running_mean, running_var, momentum, layout == "channels_last")
    _check(error)
    return mean, var


# Training reads x from device memory once where it pays (`read_once`, measured in experiments/NOTES.md,
# "Training"): a block per channel (NCHW) or per 32 bytes of channels (channels_last, where there are enough
# such groups) where that fits in a block's shared memory; the persistent grid for float32 NCHW channels of 32 MB or more (it synchronises the
# whole grid once per channel, a few microseconds); otherwise three kernels.
CHANNEL_BLOCK_BYTES = 112 << 10
GROUP_BYTES = 32  # of each channels_last row, the kernel's GROUP_BYTES
GROUP_MIN_BLOCKS = 64  # fewer channel groups than this ran slower than three kernels (4-32 of them, H100)
GRID_MIN_CHANNEL_BYTES = 32 << 20


def read_once(x, layout: str, config=None) -> str:
    """The one kernel that runs the training forward of x (into a freshly allocated, so aligned, output):
    "channel", "group" (channels_last), "grid", or "" for three kernels; `config` holds a CudaConfig's fields
    (its `fused` decides; None: the default). The rule, in one place."""
    fused = -1 if config is None else config[3]
    n, c, h, w = x.shape
    channel_bytes = n * h * w * x.element_size()
    if fused == 0:
        return ""
    if layout == "channels_last":
        row_bytes = c * x.element_size()
        fits = n * h * w * min(row_bytes, GROUP_BYTES) <= CHANNEL_BLOCK_BYTES
        return "group" if fits and -(-row_bytes // GROUP_BYTES) >= GROUP_MIN_BLOCKS else ""
    if channel_bytes <= CHANNEL_BLOCK_BYTES:
        return "channel"
    grid_applies = (x.dtype == torch.float32 and h * w % 4 == 0 and n * h * w < 2 ** 33
                    and x.data_ptr() % 16 == 0)
    return "grid" if grid_applies and (fused == 1 or channel_bytes >= GRID_MIN_CHANNEL_BYTES) else ""


def fused_training(x, y, weight, bias, running_mean, running_var, momentum: float, eps: float, kernel: str):
    """y = x normalised with its batch statistics, the running statistics updated, in one read of x by
    `kernel` ("channel", "group" or "grid", as read_once chose; the module tells the first two apart by x's
    memory layout)."""
    error = module().fused_training(x, y, weight, bias, running_mean, running_var, momentum, eps,
                                    kernel != "grid")
    _check(error)


def _check(error: str):
    """The bound functions return an error message instead of raising (CPP_SOURCE says why)."""
    if error:
        raise RuntimeError(error)


_sm_counts = {}


def _sm_count(device) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]
