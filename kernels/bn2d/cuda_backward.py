"""The backward kernels: dx, dweight and dbias from dy, x and the statistics the forward used.

With M = N*H*W, invstd = rsqrt(var + eps) and w = weight (1 without one), per channel c:

* training (mean, var the batch's): dx = w*invstd*(dy - sum(dy)/M - (x-mean)*invstd^2*sum(dy*(x-mean))/M);
* frozen (eval with running statistics): dx = dy*w*invstd;
* both: dweight = invstd*sum(dy*(x-mean)), dbias = sum(dy).

Two sums per channel, then dx = dy * a[c] + (x - mean[c]) * b[c] + k[c] (frozen: b = k = 0). Three kernels in
general, the backward counterparts of cuda_training.py's statistics kernels:

* ``nchw_backward_reduce_kernel`` / ``channels_last_backward_reduce_kernel`` -- a block sums a piece of its
  channels into partial (sum(dy), sum(dy*(x-mean))) per (piece, channel), float32 (float64 for float64 input),
  on the statistics kernels' grid (STATS_BLOCKS_PER_SM blocks per SM, the tensor in one wave);
* ``backward_finalize_kernel`` -- a warp per channel adds its pieces in float64, writes dweight and dbias (where
  asked) and the channel's coefficients (a, b, k, mean);
* ``nchw_backward_elementwise_kernel`` / ``channels_last_backward_elementwise_kernel`` -- dx from dy, x and the
  coefficients (frozen: from dy alone);

and one kernel that reads dy and x from device memory once where they fit in a block's shared memory, the
counterparts of the forward's ``channel_kernel`` and ``channel_group_kernel``:

* ``channel_backward_kernel`` -- a block per NCHW channel; ``channel_group_backward_kernel`` -- a block per
  GROUP_BYTES of each channels_last row.

Frozen BatchNorm's dx needs no sums: without dweight and dbias, the reduction is skipped. The choice of kernel is
`backward_kernel`, at the bottom; the C++ side launches what it is told.
"""
import torch

DECLARATIONS = r"""
namespace bn2d {
// The backward, as the Python rule chose: three kernels (Reduce), or one that reads dy and x once, a block per
// NCHW channel (Channel) or per group of channels_last channels (Group).
enum class BackwardKernel : int { Reduce, Channel, Group };

struct BackwardLaunch {
  DType dtype;
  BackwardKernel kernel;
  const void* dy;
  const void* x;
  void* dx;  // null: not asked
  Params params;  // weight (has_weight), mean, var and eps; no bias
  void* dweight;  // null: not asked; float32 (grads_fp32) or the input's dtype, as dbias
  void* dbias;
  bool grads_fp32;
  bool training;  // mean and var are the batch's: their gradients fold into dx
  int64_t numel, channels, plane;
  bool channels_last;  // indexed as NHWC (the group kernel; the three kernels also for NCHW with 1x1 planes)
  // Reduce: acc_t (float32; float64 for float64 input), 2 * backward_parts() * channels partial sums, then
  // (where dx is asked) 4 * channels coefficients.
  void* workspace;
  cudaStream_t stream;
};

// Pieces per channel of the reduction (0: none runs).
int64_t backward_parts(const BackwardLaunch& l);
// Shared memory the read-once kernel needs for dy and x, its own arrays included (0 for Reduce).
int64_t backward_shared_bytes(const BackwardLaunch& l);
cudaError_t launch_backward(const BackwardLaunch& l);

}  // namespace bn2d
"""

KERNELS = r"""
namespace bn2d {
namespace {

// The statistics kernels' block and grid (cuda_training.py): one wave of blocks, each looping over many
// vectors, so that the block's closing reduction is paid once.
constexpr int BACKWARD_THREADS = STATS_THREADS;
constexpr int BACKWARD_BLOCKS_PER_SM = STATS_BLOCKS_PER_SM;

// A channel's dx coefficients, dx = dy * a + (x - mean) * b + k, and its invstd (for dweight). In float64 from
// the float64 sums: one channel's worth of arithmetic. x - mean, not x * b + k' with the mean folded into k':
// where the mean is large against the spread, x * b and k' nearly cancel, and a float32 k' keeps too few of the
// bits left (mean 100, spread 1: seven of them lost).
struct Gradient { double invstd, a, b, k; };

// 1 / sqrt(v) in float64 without the library's rsqrt, whose call to a slow path spills the registers live
// across it: float32's estimate (2 ulp) refined by two Newton steps, each doubling the correct bits. v must lie
// in float32's normal range, as var + eps does for any eps >= 1e-38 and data of magnitude below 1e19.
__device__ __forceinline__ double invsqrt(double v) {
  double y = double(rsqrtf(float(v)));
  y = y * (1.5 - 0.5 * v * y * y);
  return y * (1.5 - 0.5 * v * y * y);
}

__device__ __forceinline__ Gradient gradient_of(double weight, double var, double eps, double sum_dy,
                                                double sum_dy_xmu, double per_value, bool training) {
  const double invstd = invsqrt(var + eps);
  const double a = weight * invstd;
  if (!training) return {invstd, a, 0.0, 0.0};
  return {invstd, a, -a * invstd * invstd * sum_dy_xmu * per_value, -a * sum_dy * per_value};
}

// dweight or dbias (float32 or the input's dtype).
template <typename scalar_t>
__device__ __forceinline__ void store_gradient(void* p, bool fp32, int64_t c, double v) {
  using acc_t = typename Acc<scalar_t>::type;
  if (fp32) {
    static_cast<float*>(p)[c] = float(v);
  } else {
    from_acc(acc_t(v), static_cast<scalar_t*>(p)[c]);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dx_of(acc_t dy, acc_t x, acc_t a, acc_t b, acc_t k, acc_t mean) {
  return dy * a + ((x - mean) * b + k);
}

// Contiguous NCHW: block (c, part) sums vectors [part * chunk, (part + 1) * chunk) of channel c's
// N * plane_vecs, as nchw_stats_kernel visits them. Every load is made, those past the piece's end clamped to
// its last vector (an L1 hit) and not counted: a load that may not happen keeps its register's old value, and
// the compiler then waits for each 16-bit vector in turn (cuda_eval.py, nchw_kernel).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(BACKWARD_THREADS, BACKWARD_BLOCKS_PER_SM) nchw_backward_reduce_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const Params p,
    typename Acc<scalar_t>::type* __restrict__ partial, int64_t channels, int64_t units, int64_t plane_vecs,
    FastDiv plane_div, int64_t parts, int64_t chunk) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[32];
  const int64_t c = blockIdx.x / parts, part = blockIdx.x % parts;
  const int64_t end = min(units, (part + 1) * chunk);
  const bool narrow = units < (int64_t(1) << 31);
  const acc_t mean = load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, c);
  const vec_t* dyv = reinterpret_cast<const vec_t*>(dy);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  // A step's sums in acc_t, the thread's running sums of them in float64: a thread of this one-wave grid may
  // take 10^5 values of a channel (2^31 elements, two channels), and a float32 running sum of that many steps
  // loses ~1e-5 of a sum of random signs.
  double sum_dy = 0, sum_dy_xmu = 0;
  for (int64_t base = part * chunk + threadIdx.x; base < end; base += int64_t(blockDim.x) * UNROLL) {
    vec_t g[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = min(base + u * int64_t(blockDim.x), end - 1);
      const int64_t n = narrow ? int64_t(plane_div(uint32_t(i))) : i / plane_vecs;
      const int64_t at = (n * channels + c) * plane_vecs + (i - n * plane_vecs);
      g[u] = dyv[at];
      v[u] = xv[at];
    }
    acc_t step_dy = 0, step_dy_xmu = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (base + u * int64_t(blockDim.x) < end)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t d = to_acc(g[u].v[j]);
          step_dy += d;
          step_dy_xmu += d * (to_acc(v[u].v[j]) - mean);
        }
    sum_dy += step_dy;
    sum_dy_xmu += step_dy_xmu;
  }
  const double total_dy = block_sum(sum_dy, scratch);
  const double total_dy_xmu = block_sum(sum_dy_xmu, scratch);
  if (threadIdx.x == 0) {
    partial[part * channels + c] = acc_t(total_dy);
    partial[(parts + part) * channels + c] = acc_t(total_dy_xmu);
  }
}

// NHWC: thread t of block (bx, by) owns channels c0 .. c0 + VEC - 1, c0 = (bx * cols + t % cols) * VEC, and
// visits rows by * height + t / cols, then every gridDim.y * height-th, as channels_last_stats_kernel does
// (height = blockDim.x / cols); row by of the partial sums is block row by's piece. Loads clamped to the last
// row and channel vector, as there. `scratch` (dynamic shared memory): blockDim.x / 32 * cols * 2 * VEC doubles.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(BACKWARD_THREADS, BACKWARD_BLOCKS_PER_SM) channels_last_backward_reduce_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const Params p,
    typename Acc<scalar_t>::type* __restrict__ partial, int64_t rows, int64_t channels, int cols) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  double* scratch = reinterpret_cast<double*>(shared_table);
  const int col = threadIdx.x % cols, height = blockDim.x / cols;
  const int64_t c0 = (int64_t(blockIdx.x) * cols + col) * VEC;
  const bool active = c0 < channels;
  const int64_t first = min(c0, channels - VEC);
  const int64_t step = int64_t(gridDim.y) * height;
  acc_t mean[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, first + j);
  // The thread's running sums in float64 where registers allow it (at most two channels a thread: rows of single
  // elements -- so also the fewest channels, where a thread takes the most rows -- or float64 pairs), else
  // acc_t: 16-byte vectors of 16-bit channels would take 16 more registers, past this kernel's 128.
  using sum_t = std::conditional_t<(VEC <= 2), double, acc_t>;
  sum_t sum_dy[VEC] = {}, sum_dy_xmu[VEC] = {};
  for (int64_t base = int64_t(blockIdx.y) * height + threadIdx.x / cols; active && base < rows; base += step * UNROLL) {
    vec_t g[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t at = min(base + u * step, rows - 1) * channels + first;
      g[u] = *reinterpret_cast<const vec_t*>(dy + at);
      v[u] = *reinterpret_cast<const vec_t*>(x + at);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t step_dy = 0, step_dy_xmu = 0;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (base + u * step < rows) {
          const acc_t d = to_acc(g[u].v[j]);
          step_dy += d;
          step_dy_xmu += d * (to_acc(v[u].v[j]) - mean[j]);
        }
      sum_dy[j] += step_dy;
      sum_dy_xmu[j] += step_dy_xmu;
    }
  }
  double total[2 * VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    total[j] = sum_dy[j];
    total[VEC + j] = sum_dy_xmu[j];
  }
  column_sums(total, cols, scratch);
  if (!active || threadIdx.x >= cols) return;
  const int64_t parts = gridDim.y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    partial[int64_t(blockIdx.y) * channels + c0 + j] = acc_t(total[j]);
    partial[(parts + blockIdx.y) * channels + c0 + j] = acc_t(total[VEC + j]);
  }
}

// A warp per channel adds its `parts` pieces in float64 and writes dweight and dbias (null: not asked) and the
// coefficients of dx (null: dx not asked): a[c], b[c], k[c] and mean[c], four arrays of `channels`. With no
// pieces (frozen dx alone, or an empty batch) the sums are zero.
template <typename scalar_t>
__global__ void backward_finalize_kernel(const typename Acc<scalar_t>::type* __restrict__ partial, int64_t parts,
                                         int64_t channels, const Params p, double per_value, bool training,
                                         typename Acc<scalar_t>::type* __restrict__ coefficients, void* dweight,
                                         void* dbias, bool grads_fp32) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // the whole warp: it shares c
  const acc_t mean = load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, c);  // in flight with the sums
  const acc_t var = load_param<scalar_t, acc_t>(p.var, p.stats_fp32, c);
  const acc_t weight = load_param<scalar_t, acc_t>(p.weight, p.affine_fp32, c);
  double sum_dy = 0, sum_dy_xmu = 0;
  for (int64_t q = lane; q < parts; q += 32) {
    sum_dy += partial[q * channels + c];
    sum_dy_xmu += partial[(parts + q) * channels + c];
  }
  sum_dy = warp_sum(sum_dy);
  sum_dy_xmu = warp_sum(sum_dy_xmu);
  if (lane != 0) return;
  const Gradient g = gradient_of(p.has_weight ? double(weight) : 1.0, var, p.eps, sum_dy, sum_dy_xmu, per_value,
                                 training);
  if (dweight != nullptr) store_gradient<scalar_t>(dweight, grads_fp32, c, sum_dy_xmu * g.invstd);
  if (dbias != nullptr) store_gradient<scalar_t>(dbias, grads_fp32, c, sum_dy);
  if (coefficients != nullptr) {
    coefficients[c] = acc_t(g.a);
    coefficients[channels + c] = acc_t(g.b);
    coefficients[2 * channels + c] = acc_t(g.k);
    coefficients[3 * channels + c] = mean;
  }
}

// dx for contiguous NCHW: block (c, part) writes vectors [part * chunk, (part + 1) * chunk) of channel c, as
// the reduction visits them, with the channel's coefficients in registers. FROZEN: dx = dy * a, x unread.
template <typename scalar_t, int VEC, bool FROZEN>
__global__ void __launch_bounds__(BACKWARD_THREADS) nchw_backward_elementwise_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
    const typename Acc<scalar_t>::type* __restrict__ coefficients, int64_t channels, int64_t units,
    int64_t plane_vecs, FastDiv plane_div, int64_t parts, int64_t chunk) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t c = blockIdx.x / parts, part = blockIdx.x % parts;
  const int64_t end = min(units, (part + 1) * chunk);
  const bool narrow = units < (int64_t(1) << 31);
  const acc_t a = coefficients[c];
  const acc_t b = FROZEN ? acc_t(0) : coefficients[channels + c];
  const acc_t k = FROZEN ? acc_t(0) : coefficients[2 * channels + c];
  const acc_t mean = FROZEN ? acc_t(0) : coefficients[3 * channels + c];
  const vec_t* dyv = reinterpret_cast<const vec_t*>(dy);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  vec_t* dxv = reinterpret_cast<vec_t*>(dx);
  for (int64_t base = part * chunk + threadIdx.x; base < end; base += int64_t(blockDim.x) * UNROLL) {
    int64_t at[UNROLL];
    vec_t g[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t i = min(base + u * int64_t(blockDim.x), end - 1);
      const int64_t n = narrow ? int64_t(plane_div(uint32_t(i))) : i / plane_vecs;
      at[u] = (n * channels + c) * plane_vecs + (i - n * plane_vecs);
      g[u] = dyv[at[u]];
      if (!FROZEN) v[u] = xv[at[u]];
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u * int64_t(blockDim.x) >= end) continue;
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = to_acc(g[u].v[j]);
        from_acc(FROZEN ? d * a : dx_of(d, to_acc(v[u].v[j]), a, b, k, mean), out.v[j]);
      }
      dxv[at[u]] = out;
    }
  }
}

// dx for NHWC: threads and rows as in channels_last_backward_reduce_kernel, the thread's VEC channels'
// coefficients in registers.
template <typename scalar_t, int VEC, bool FROZEN>
__global__ void __launch_bounds__(BACKWARD_THREADS) channels_last_backward_elementwise_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
    const typename Acc<scalar_t>::type* __restrict__ coefficients, int64_t rows, int64_t channels, int cols) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const int col = threadIdx.x % cols, height = blockDim.x / cols;
  const int64_t c0 = (int64_t(blockIdx.x) * cols + col) * VEC;
  if (c0 >= channels) return;
  const int64_t step = int64_t(gridDim.y) * height;
  acc_t a[VEC], b[VEC], k[VEC], mean[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    a[j] = coefficients[c0 + j];
    b[j] = FROZEN ? acc_t(0) : coefficients[channels + c0 + j];
    k[j] = FROZEN ? acc_t(0) : coefficients[2 * channels + c0 + j];
    mean[j] = FROZEN ? acc_t(0) : coefficients[3 * channels + c0 + j];
  }
  for (int64_t base = int64_t(blockIdx.y) * height + threadIdx.x / cols; base < rows; base += step * UNROLL) {
    vec_t g[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t at = min(base + u * step, rows - 1) * channels + c0;
      g[u] = *reinterpret_cast<const vec_t*>(dy + at);
      if (!FROZEN) v[u] = *reinterpret_cast<const vec_t*>(x + at);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t r = base + u * step;
      if (r >= rows) continue;
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = to_acc(g[u].v[j]);
        from_acc(FROZEN ? d * a[j] : dx_of(d, to_acc(v[u].v[j]), a[j], b[j], k[j], mean[j]), out.v[j]);
      }
      *reinterpret_cast<vec_t*>(dx + r * channels + c0) = out;
    }
  }
}

// The backward reading dy and x from device memory once, for a channel that fits in shared memory (NCHW): a
// block per channel loads both while summing them, keeping them in shared memory where dx needs them again
// (training: its coefficients need the channel's sums), then writes dx from there. Frozen, dx = dy * a needs
// no sums and is written as dy arrives; x is read only for dweight. One launch, no workspace. Launch bounds
// with a minimum of one block: without it, ptxas held the float64 builds of both read-once kernels to 64
// registers on sm_90 and spilled a value live across the loop (experiments.sass).
template <typename scalar_t, int VEC, bool FROZEN>
__global__ void __launch_bounds__(CHANNEL_THREADS, 1) channel_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, const Params p,
    void* dweight, void* dbias, bool grads_fp32, int64_t channels, int units, int64_t plane_vecs,
    FastDiv plane_div, double per_value) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[32];
  vec_t* stash_dy = reinterpret_cast<vec_t*>(shared_table);
  vec_t* stash_x = stash_dy + units;
  const vec_t* dyv = reinterpret_cast<const vec_t*>(dy);
  const vec_t* xv = reinterpret_cast<const vec_t*>(x);
  vec_t* dxv = reinterpret_cast<vec_t*>(dx);
  const int64_t c = blockIdx.x;
  // In flight while dy and x are summed.
  const acc_t mean = load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, c);
  const acc_t var = load_param<scalar_t, acc_t>(p.var, p.stats_fp32, c);
  const acc_t weight = p.has_weight ? load_param<scalar_t, acc_t>(p.weight, p.affine_fp32, c) : acc_t(1);
  const bool writes = dx != nullptr, reads_x = !FROZEN || dweight != nullptr;
  const acc_t frozen_a = FROZEN ? acc_t(double(weight) * invsqrt(double(var) + p.eps)) : acc_t(0);
  auto at = [&](int i) {  // the offset of the channel's i-th vector in dy, x and dx
    const uint32_t n = plane_div(uint32_t(i));
    return (int64_t(n) * channels + c) * plane_vecs + (i - int64_t(n) * plane_vecs);
  };
  acc_t sum_dy = 0, sum_dy_xmu = 0;
  for (int base = threadIdx.x; base < units; base += blockDim.x * UNROLL) {
    vec_t g[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // clamped, as in nchw_backward_reduce_kernel
      const int64_t o = at(min(base + u * int(blockDim.x), units - 1));
      g[u] = dyv[o];
      v[u] = reads_x ? xv[o] : vec_t{};
    }
    acc_t step_dy = 0, step_dy_xmu = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * blockDim.x;
      if (i >= units) continue;
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = to_acc(g[u].v[j]);
        step_dy += d;
        step_dy_xmu += d * (to_acc(v[u].v[j]) - mean);
        if (FROZEN) from_acc(d * frozen_a, out.v[j]);
      }
      if (FROZEN && writes) dxv[at(i)] = out;
      if (!FROZEN && writes) {
        stash_dy[i] = g[u];
        stash_x[i] = v[u];
      }
    }
    sum_dy += step_dy;
    sum_dy_xmu += step_dy_xmu;
  }
  const double total_dy = block_sum(double(sum_dy), scratch);
  const double total_dy_xmu = block_sum(double(sum_dy_xmu), scratch);
  const Gradient gr = gradient_of(weight, var, p.eps, total_dy, total_dy_xmu, per_value, !FROZEN);
  if (threadIdx.x == 0 && dweight != nullptr)
    store_gradient<scalar_t>(dweight, grads_fp32, c, total_dy_xmu * gr.invstd);
  if (threadIdx.x == 0 && dbias != nullptr) store_gradient<scalar_t>(dbias, grads_fp32, c, total_dy);
  if (FROZEN || !writes) return;
  const acc_t a = acc_t(gr.a), b = acc_t(gr.b), k = acc_t(gr.k);
  // Each thread reads back the vectors it stashed: no barrier needed.
  for (int i = threadIdx.x; i < units; i += blockDim.x) {
    const vec_t g = stash_dy[i], v = stash_x[i];
    vec_t out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) from_acc(dx_of(to_acc(g.v[j]), to_acc(v.v[j]), a, b, k, mean), out.v[j]);
    dxv[at(i)] = out;
  }
}

// The same for channels_last, where a channel is a column of the N * H * W rows: a block per group of
// GROUP_BYTES-wide columns (one 32-byte sector per row), thread t on column t % cols of every
// (blockDim.x / cols)-th row, as channel_group_kernel does; the column sums of both (column_sums) in one go.
template <typename scalar_t, int VEC, bool FROZEN>
__global__ void __launch_bounds__(CHANNEL_THREADS, 1) channel_group_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, const Params p,
    void* dweight, void* dbias, bool grads_fp32, int64_t channels, int rows, int cols, double per_value) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[CHANNEL_THREADS / 32 * GROUP_BYTES];  // cols * VEC <= 16 channels, two sums each
  vec_t* stash_dy = reinterpret_cast<vec_t*>(shared_table);
  vec_t* stash_x = stash_dy + rows * cols;
  const int col = threadIdx.x % cols, step = blockDim.x / cols;
  const int64_t c0 = (int64_t(blockIdx.x) * cols + col) * VEC;  // the thread's first channel
  const bool active = c0 < channels;  // channels is a multiple of VEC
  const int64_t row_vecs = channels / VEC;
  const vec_t* dyv = reinterpret_cast<const vec_t*>(dy) + c0 / VEC;
  const vec_t* xv = reinterpret_cast<const vec_t*>(x) + c0 / VEC;
  vec_t* dxv = reinterpret_cast<vec_t*>(dx) + c0 / VEC;
  const bool writes = dx != nullptr, reads_x = !FROZEN || dweight != nullptr;
  auto channel = [&](int j) { return active ? c0 + j : int64_t(0); };  // channel 0's, unused, past the last
  acc_t mean[VEC], a[VEC];  // a: frozen dx = dy * a, known before the loop
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    mean[j] = load_param<scalar_t, acc_t>(p.mean, p.stats_fp32, channel(j));
    if (FROZEN) {
      const acc_t weight = p.has_weight ? load_param<scalar_t, acc_t>(p.weight, p.affine_fp32, channel(j)) : acc_t(1);
      const acc_t var = load_param<scalar_t, acc_t>(p.var, p.stats_fp32, channel(j));
      a[j] = acc_t(double(weight) * invsqrt(double(var) + p.eps));
    }
  }
  // Each thread's sums in acc_t (a column has at most a few rows per thread), the block's in float64.
  acc_t sum[2 * VEC] = {};  // sum(dy) of each channel, then sum(dy * (x - mean))
  for (int base = threadIdx.x / cols; active && base < rows; base += step * UNROLL) {
    vec_t g[UNROLL], v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // clamped to the last row, as in channels_last_backward_reduce_kernel
      const int64_t o = int64_t(min(base + u * step, rows - 1)) * row_vecs;
      g[u] = dyv[o];
      v[u] = reads_x ? xv[o] : vec_t{};
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int r = base + u * step;
      if (r >= rows) continue;
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = to_acc(g[u].v[j]);
        sum[j] += d;
        sum[VEC + j] += d * (to_acc(v[u].v[j]) - mean[j]);
        if (FROZEN) from_acc(d * a[j], out.v[j]);
      }
      if (FROZEN && writes) dxv[int64_t(r) * row_vecs] = out;
      if (!FROZEN && writes) {
        stash_dy[r * cols + col] = g[u];
        stash_x[r * cols + col] = v[u];
      }
    }
  }
  // Loaded here, in flight across the column sums: held through the loop, training's 16-bit build spilled.
  acc_t var[VEC], weight[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    var[j] = load_param<scalar_t, acc_t>(p.var, p.stats_fp32, channel(j));
    weight[j] = p.has_weight ? load_param<scalar_t, acc_t>(p.weight, p.affine_fp32, channel(j)) : acc_t(1);
  }
  double total[2 * VEC];
#pragma unroll
  for (int j = 0; j < 2 * VEC; ++j) total[j] = sum[j];
  column_sums(total, cols, scratch);
  if (!active) return;
  // The thread on row j writes channel c0 + j's dweight and dbias.
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (threadIdx.x / cols == j) {
      const double invstd = invsqrt(double(var[j]) + p.eps);
      if (dweight != nullptr) store_gradient<scalar_t>(dweight, grads_fp32, c0 + j, total[VEC + j] * invstd);
      if (dbias != nullptr) store_gradient<scalar_t>(dbias, grads_fp32, c0 + j, total[j]);
    }
  if (FROZEN || !writes) return;
  acc_t b[VEC], k[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const Gradient gr = gradient_of(weight[j], var[j], p.eps, total[j], total[VEC + j], per_value, true);
    a[j] = acc_t(gr.a);
    b[j] = acc_t(gr.b);
    k[j] = acc_t(gr.k);
  }
  for (int r = threadIdx.x / cols; r < rows; r += step) {  // the vectors this thread stashed
    const vec_t g = stash_dy[r * cols + col], v = stash_x[r * cols + col];
    vec_t out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) from_acc(dx_of(to_acc(g.v[j]), to_acc(v.v[j]), a[j], b[j], k[j], mean[j]), out.v[j]);
    dxv[int64_t(r) * row_vecs] = out;
  }
}


// --- Launchers ---

bool backward_sums(const BackwardLaunch& l) {
  return l.dweight != nullptr || l.dbias != nullptr || (l.training && l.dx != nullptr);
}

// The widest vector of `full`, `full / 2` (`half`: NCHW, 14x14 planes of a 16-bit type) and 1 that dy, x, dx and
// the planes (NCHW) or rows of channels (channels_last) are a whole number of.
int backward_vec(const BackwardLaunch& l, bool half) {
  const int size = element_size(l.dtype), full = VEC_BYTES / size;
  const int64_t length = l.channels_last ? l.channels : l.plane;
  auto fits = [&](int vec) {
    const size_t bytes = size_t(vec) * size;
    return aligned(l.dy, bytes) && aligned(l.x, bytes) && (l.dx == nullptr || aligned(l.dx, bytes)) &&
           length % vec == 0;
  };
  if (fits(full)) return full;
  if (half && full > 2 && fits(full / 2)) return full / 2;
  return 1;
}

// `f` with the compile-time vector width `vec` (one of backward_vec's; HALF: half vectors built too).
template <typename scalar_t, bool HALF, typename F>
cudaError_t with_vec(int vec, F&& f) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  if (vec == VEC) return f(std::integral_constant<int, VEC>());
  if constexpr (HALF && VEC > 2) {
    if (vec == VEC / 2) return f(std::integral_constant<int, VEC / 2>());
  }
  return f(std::integral_constant<int, 1>());
}

// The reduction's grid, as stats_grid's: STATS_BLOCKS_PER_SM blocks per SM; NCHW: `parts` blocks of `chunk`
// vectors per channel; channels_last: `gx` blocks of `cols` threads across the row by `parts` down the rows.
struct BackwardGrid {
  int vec;
  int64_t cols, gx, parts, chunk;
};

BackwardGrid reduce_grid(const BackwardLaunch& l) {
  const int64_t blocks = int64_t(sm_count()) * BACKWARD_BLOCKS_PER_SM, rows = l.numel / l.channels;
  if (!l.channels_last) {
    const int vec = backward_vec(l, true);
    const int64_t units = rows / vec;
    const int64_t parts =
        std::max<int64_t>(std::min(cdiv(blocks, l.channels), cdiv(units, BACKWARD_THREADS * UNROLL)), 1);
    const int64_t chunk = cdiv(units, parts);
    return {vec, 0, l.channels, cdiv(units, chunk), chunk};  // no empty piece
  }
  const int vec = backward_vec(l, false);
  const int64_t cols = row_threads(cdiv(l.channels, vec), BACKWARD_THREADS), height = BACKWARD_THREADS / cols;
  const int64_t gx = cdiv(cdiv(l.channels, vec), cols);
  const int64_t parts = std::max<int64_t>(std::min({cdiv(blocks, gx), cdiv(rows, height * UNROLL), int64_t(65535)}), 1);
  return {vec, cols, gx, parts, 0};
}

template <typename scalar_t>
cudaError_t reduce_launch(const BackwardLaunch& l, const BackwardGrid& g) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* dy = static_cast<const scalar_t*>(l.dy);
  const scalar_t* x = static_cast<const scalar_t*>(l.x);
  acc_t* partial = static_cast<acc_t*>(l.workspace);
  const int64_t rows = l.numel / l.channels;
  if (l.channels_last) {
    return with_vec<scalar_t, false>(g.vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const size_t shared = size_t(BACKWARD_THREADS / 32) * g.cols * 2 * VEC * sizeof(double);
      channels_last_backward_reduce_kernel<scalar_t, VEC><<<dim3(g.gx, g.parts), BACKWARD_THREADS, shared, l.stream>>>(
          dy, x, l.params, partial, rows, l.channels, int(g.cols));
      return cudaGetLastError();
    });
  }
  return with_vec<scalar_t, true>(g.vec, [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    const int64_t plane_vecs = l.plane / VEC;
    nchw_backward_reduce_kernel<scalar_t, VEC><<<g.gx * g.parts, BACKWARD_THREADS, 0, l.stream>>>(
        dy, x, l.params, partial, l.channels, rows / VEC, plane_vecs,
        make_fast_div(uint32_t(std::min<int64_t>(plane_vecs, INT32_MAX))), g.parts, g.chunk);
    return cudaGetLastError();
  });
}

// dx's kernel: NCHW, a block per tile of BACKWARD_THREADS * UNROLL vectors of a channel (the tensor in one
// sweep, as the eval kernels); channels_last, the reduction's columns and enough rows of blocks to cover the
// rows once (at most 65535, then each block loops).
template <typename scalar_t, bool FROZEN>
cudaError_t elementwise_launch(const BackwardLaunch& l, const typename Acc<scalar_t>::type* coefficients) {
  const scalar_t* dy = static_cast<const scalar_t*>(l.dy);
  const scalar_t* x = static_cast<const scalar_t*>(l.x);
  scalar_t* dx = static_cast<scalar_t*>(l.dx);
  const int64_t rows = l.numel / l.channels;
  if (l.channels_last) {
    return with_vec<scalar_t, false>(backward_vec(l, false), [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const int64_t vectors = l.channels / VEC, cols = row_threads(vectors, BACKWARD_THREADS);
      const int64_t gx = cdiv(vectors, cols), height = BACKWARD_THREADS / cols;
      const int64_t gy = std::max<int64_t>(std::min<int64_t>(cdiv(rows, height * UNROLL), 65535), 1);
      channels_last_backward_elementwise_kernel<scalar_t, VEC, FROZEN><<<dim3(gx, gy), BACKWARD_THREADS, 0, l.stream>>>(
          dy, x, dx, coefficients, rows, l.channels, int(cols));
      return cudaGetLastError();
    });
  }
  return with_vec<scalar_t, true>(backward_vec(l, true), [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    const int64_t plane_vecs = l.plane / VEC, units = rows / VEC;
    // At most 2^31 - 1 blocks: past that (2^41 elements), blocks take several tiles.
    const int64_t most = std::min(cdiv(units, BACKWARD_THREADS * UNROLL), int64_t(INT32_MAX) / l.channels);
    const int64_t chunk = cdiv(units, std::max<int64_t>(most, 1)), parts = cdiv(units, chunk);
    nchw_backward_elementwise_kernel<scalar_t, VEC, FROZEN><<<l.channels * parts, BACKWARD_THREADS, 0, l.stream>>>(
        dy, x, dx, coefficients, l.channels, units, plane_vecs,
        make_fast_div(uint32_t(std::min<int64_t>(plane_vecs, INT32_MAX))), parts, chunk);
    return cudaGetLastError();
  });
}

// Reduce (where sums are asked), finalize, then dx (where asked).
template <typename scalar_t>
cudaError_t reduce_path_typed(const BackwardLaunch& l) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t parts = backward_parts(l);
  acc_t* coefficients =
      l.dx != nullptr && l.numel > 0 ? static_cast<acc_t*>(l.workspace) + 2 * parts * l.channels : nullptr;
  if (parts > 0) {
    if (const cudaError_t error = reduce_launch<scalar_t>(l, reduce_grid(l)); error != cudaSuccess) return error;
  }
  if (!backward_sums(l) && coefficients == nullptr) return cudaSuccess;  // nothing asked
  const int64_t rows = l.numel / l.channels;
  backward_finalize_kernel<scalar_t><<<cdiv(l.channels * 32, 256), 256, 0, l.stream>>>(
      static_cast<const acc_t*>(l.workspace), parts, l.channels, l.params, rows > 0 ? 1.0 / double(rows) : 0.0,
      l.training, coefficients, l.dweight, l.dbias, l.grads_fp32);
  if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess || coefficients == nullptr) return error;
  return l.training ? elementwise_launch<scalar_t, false>(l, coefficients)
                    : elementwise_launch<scalar_t, true>(l, coefficients);
}

// The read-once kernels' static shared memory: a double per warp (NCHW), or per warp and column sum.
constexpr int64_t CHANNEL_SCRATCH_BYTES = 32 * sizeof(double);
constexpr int64_t GROUP_SCRATCH_BYTES = CHANNEL_THREADS / 32 * GROUP_BYTES * sizeof(double);

// Dynamic shared memory of a read-once kernel: dy and x stashed where a training dx is asked, else none.
int64_t stash_bytes(const BackwardLaunch& l) {
  if (!l.training || l.dx == nullptr) return 0;
  const int64_t rows = l.numel / l.channels;
  return 2 * rows * (l.kernel == BackwardKernel::Group ? GROUP_BYTES : element_size(l.dtype));
}

template <typename Kernel>
cudaError_t read_once_shared(Kernel kernel, int64_t shared, int64_t scratch) {
  if (shared + scratch > device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)) return cudaErrorInvalidValue;
  return reserve_shared(kernel, size_t(shared));
}

template <typename scalar_t, bool FROZEN>
cudaError_t channel_launch_typed(const BackwardLaunch& l) {
  const double per_value = 1.0 / double(l.numel / l.channels);
  return with_vec<scalar_t, true>(backward_vec(l, true), [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    const auto kernel = channel_backward_kernel<scalar_t, VEC, FROZEN>;
    const int64_t shared = stash_bytes(l), plane_vecs = l.plane / VEC;
    if (const cudaError_t error = read_once_shared(kernel, shared, CHANNEL_SCRATCH_BYTES); error != cudaSuccess)
      return error;
    kernel<<<l.channels, channel_threads(kernel, size_t(shared), l.channels), size_t(shared), l.stream>>>(
        static_cast<const scalar_t*>(l.dy), static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.dx),
        l.params, l.dweight, l.dbias, l.grads_fp32, l.channels, int(l.numel / l.channels / VEC), plane_vecs,
        make_fast_div(uint32_t(plane_vecs)), per_value);
    return cudaGetLastError();
  });
}

template <typename scalar_t, bool FROZEN>
cudaError_t group_launch_typed(const BackwardLaunch& l) {
  const int64_t rows = l.numel / l.channels;
  return with_vec<scalar_t, false>(backward_vec(l, false), [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    const auto kernel = channel_group_backward_kernel<scalar_t, VEC, FROZEN>;
    const int cols = GROUP_BYTES / int(sizeof(scalar_t)) / VEC;
    const int64_t shared = stash_bytes(l), groups = cdiv(l.channels, int64_t(cols) * VEC);
    if (const cudaError_t error = read_once_shared(kernel, shared, GROUP_SCRATCH_BYTES); error != cudaSuccess)
      return error;
    kernel<<<groups, channel_threads(kernel, size_t(shared), groups), size_t(shared), l.stream>>>(
        static_cast<const scalar_t*>(l.dy), static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.dx),
        l.params, l.dweight, l.dbias, l.grads_fp32, l.channels, int(rows), cols, 1.0 / double(rows));
    return cudaGetLastError();
  });
}

template <typename scalar_t>
cudaError_t backward_typed(const BackwardLaunch& l) {
  if (l.kernel == BackwardKernel::Reduce || l.numel == 0) return reduce_path_typed<scalar_t>(l);
  if (!backward_sums(l) && l.dx == nullptr) return cudaSuccess;
  if (l.kernel == BackwardKernel::Channel)
    return l.training ? channel_launch_typed<scalar_t, false>(l) : channel_launch_typed<scalar_t, true>(l);
  return l.training ? group_launch_typed<scalar_t, false>(l) : group_launch_typed<scalar_t, true>(l);
}

}  // namespace

int64_t backward_parts(const BackwardLaunch& l) {
  if ((l.kernel != BackwardKernel::Reduce && l.numel > 0) || l.numel == 0 || !backward_sums(l)) return 0;
  return reduce_grid(l).parts;
}

int64_t backward_shared_bytes(const BackwardLaunch& l) {
  if (l.kernel == BackwardKernel::Reduce || l.numel == 0) return 0;
  return stash_bytes(l) + (l.kernel == BackwardKernel::Group ? GROUP_SCRATCH_BYTES : CHANNEL_SCRATCH_BYTES);
}

cudaError_t launch_backward(const BackwardLaunch& l) { BN2D_DISPATCH(l.dtype, backward_typed, l); }

}  // namespace bn2d
"""

BINDINGS = r"""
// The backward: dx, dweight and dbias (each given where asked, else None; dweight and dbias float32 or x's
// dtype) of the normalisation of x with `mean` and `var` (training: x's batch statistics; else frozen running
// ones), by `kernel`: "" three kernels, "channel" (contiguous NCHW) or "group" (channels_last) one that reads dy
// and x once (their channel or group must fit in a block's shared memory). dy may differ from x's strides only
// where a dimension of size 1 makes that the same memory.
std::string backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const c10::optional<at::Tensor>& weight, double eps, bool training,
                     const c10::optional<at::Tensor>& dx, const c10::optional<at::Tensor>& dweight,
                     const c10::optional<at::Tensor>& dbias, bool channels_last, const std::string& kernel) {
  if (auto error = check_io(x, x); !error.empty()) return error;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  BN2D_REQUIRE(x.is_contiguous(format), "the input's memory layout does not match `channels_last`");
  BN2D_REQUIRE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device() &&
                   dy.is_contiguous(format),
               "the output gradient must have the input's shape, dtype, device and memory layout");
  if (dx.has_value()) {
    if (auto error = check_io(x, *dx); !error.empty()) return error;
  }
  if (auto error = check_pair(x, mean, var); !error.empty()) return error;
  if (auto error = check_pair(x, weight, c10::nullopt); !error.empty()) return error;
  if (auto error = check_pair(x, dweight, dbias); !error.empty()) return error;
  bn2d::BackwardKernel which = bn2d::BackwardKernel::Reduce;
  if (kernel == "channel") {
    which = bn2d::BackwardKernel::Channel;
    BN2D_REQUIRE(x.is_contiguous(), "the channel backward kernel takes a contiguous (NCHW) input");
  } else if (kernel == "group") {
    which = bn2d::BackwardKernel::Group;
    BN2D_REQUIRE(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                 "the group backward kernel takes a channels_last input");
  } else {
    BN2D_REQUIRE(kernel.empty(), "unknown backward kernel '" + kernel + "'; expected '', 'channel' or 'group'");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  bn2d::BackwardLaunch launch{};
  launch.dtype = dtype_of(x);
  launch.kernel = which;
  launch.dy = dy.data_ptr();
  launch.x = x.data_ptr();
  launch.dx = dx.has_value() ? dx->data_ptr() : nullptr;
  // Without a weight, `mean` stands in for it (Params says why).
  launch.params = params_of(weight, c10::nullopt, mean, mean.data_ptr(), var.data_ptr(),
                            mean.scalar_type() == at::kFloat, eps);
  launch.dweight = dweight.has_value() ? dweight->data_ptr() : nullptr;
  launch.dbias = dbias.has_value() ? dbias->data_ptr() : nullptr;
  launch.grads_fp32 = (dweight.has_value() ? *dweight : dbias.has_value() ? *dbias : mean).scalar_type() == at::kFloat;
  launch.training = training;
  launch.numel = x.numel();
  launch.channels = x.size(1);
  launch.plane = x.size(2) * x.size(3);
  // The kernels' indexing: the channel kernel reads NCHW (1x1 planes too); the group kernel NHWC; the three
  // kernels NHWC also for NCHW with 1x1 planes, the same memory, which the channels_last kernels read best.
  launch.channels_last = which == bn2d::BackwardKernel::Group ||
                         (which == bn2d::BackwardKernel::Reduce && (channels_last || launch.plane == 1));
  launch.stream = c10::cuda::getCurrentCUDAStream().stream();
  if (launch.channels == 0) return "";
  if (const int64_t shared = bn2d::backward_shared_bytes(launch); shared > 0) {
    int device = 0, room = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&room, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    BN2D_REQUIRE(shared <= room, "the " + kernel + " backward kernel needs " + std::to_string(shared) +
                                     " bytes of shared memory for dy and x, more than a block's " +
                                     std::to_string(room) + "; use the kernel ''");
  }
  const int64_t parts = bn2d::backward_parts(launch);
  const bool coefficients = launch.dx != nullptr && launch.numel > 0 &&
                            (which == bn2d::BackwardKernel::Reduce);
  const int64_t size = (2 * parts + (coefficients ? 4 : 0)) * launch.channels;
  at::Tensor workspace;
  if (size > 0) {
    workspace = at::empty({size}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    launch.workspace = workspace.data_ptr();
  }
  return launch_error(bn2d::launch_backward(launch));
}
"""

FUNCTIONS = ["backward"]


# What the bound call names each kernel of a plan (dispatch.cuda_backward): the three-kernel path is "".
_KERNEL_NAMES = {"channel_backward_kernel": "channel", "channel_group_backward_kernel": "group"}


def kernel_name(plan) -> str:
    """The bound call's name for a backward plan's kernel."""
    return _KERNEL_NAMES.get(plan.kernels[0], "")


def backward(dy, x, mean, var, weight, eps: float, training: bool, needs, plan):
    """(dx, dweight, dbias) of y = (x - mean) * rsqrt(var + eps) * weight + bias, each None unless asked in
    `needs` (dweight also without a weight). `training`: mean and var are x's batch statistics (float32;
    float64 for float64 input), whose gradients fold into dx; else frozen running statistics (float32 or x's
    dtype). x is laid out as the `plan`'s layout (dispatch.cuda_backward), and dy is brought to it; dx takes
    x's strides, dweight weight's dtype, dbias weight's (x's without a weight). An empty batch gives zero
    dweight and dbias."""
    from . import cuda_module

    c, layout, kernel = x.size(1), plan.layout, kernel_name(plan)
    need_dx, need_dweight, need_dbias = needs[0], needs[1] and weight is not None, needs[2]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dy = dy.contiguous(memory_format=fmt)  # no copy where dy already is
    grad_dtype = x.dtype if weight is None else weight.dtype
    dx = torch.empty_like(x) if need_dx else None
    dweight = torch.empty(c, device=x.device, dtype=grad_dtype) if need_dweight else None
    dbias = torch.empty(c, device=x.device, dtype=grad_dtype) if need_dbias else None
    if need_dx or need_dweight or need_dbias:
        cuda_module._check(cuda_module.module().backward(dy, x, mean, var, weight, eps, training, dx, dweight, dbias,
                                                         layout == "channels_last", kernel))
    return dx, dweight, dbias
