"""The training-mode kernels: batch statistics, and the training forward in one kernel that reads x once.

* ``nchw_stats_kernel`` / ``channels_last_stats_kernel`` -- a block summarises a piece of its channels as
  (count, mean, M2), merged with Chan's formula, into a float64 summary per piece;
* ``finalize_stats_kernel`` -- a warp per channel merges its pieces, writes the batch mean and variance and
  updates the running statistics (the normalisation is then an eval kernel, ``cuda_eval.py``);
* ``fused_nchw_kernel`` -- the whole training forward reading x once, for large float32 NCHW channels: a
  persistent cooperative grid that keeps each channel on chip across one grid barrier;
* ``channel_kernel`` -- the same for a channel that fits in a block's shared memory, a block per channel;
  ``channel_group_kernel`` its channels_last counterpart, a block per 32 bytes of channels.
"""

DECLARATIONS = r"""
namespace bn2d {
// Training mode's batch statistics. A stats kernel summarises `parts` pieces of each channel as (count, mean,
// M2) in `summary` (three arrays of parts * channels doubles, piece p of channel c at p * channels + c); a
// finalize kernel merges each channel's pieces into its mean and biased variance (float32, float64 for
// float64 input) and updates the running statistics (float32 or the input's dtype; null: none).
// `fused`: the training forward in one kernel that reads x once and also writes y = x normalised with
// `params` (whose mean and var it ignores): a block per channel (NCHW; a channel that fits in a block's
// shared memory) or per group of channels (channels_last; 32 bytes of each row), which also write the batch
// statistics to `mean` and `var` where those are not null (for the backward), or a persistent grid
// (contiguous NCHW, float32, 16-byte aligned, planes of whole vectors), which does not.
enum class Fused : int { None, Channel, Grid };

struct StatsLaunch {
  DType dtype;
  const void* x;
  void* y;
  Params params;
  Fused fused;
  int64_t numel, channels, plane;
  bool channels_last;
  int vec;  // elements per vector access (the plan's)
  double* summary;
  void* mean;
  void* var;
  void* running_mean;
  void* running_var;
  bool running_fp32;
  double momentum;
  int64_t* batches;  // the module's num_batches_tracked, incremented by the launch where given (else null)
  cudaStream_t stream;
};

int64_t stats_parts(const StatsLaunch& l);
// Why `l` cannot run as planned (null: it can).
const char* stats_plan_error(const StatsLaunch& l);
cudaError_t launch_stats(const StatsLaunch& l);

}  // namespace bn2d
"""

KERNELS = r"""
namespace bn2d {
namespace {


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

// The module's batch count (num_batches_tracked) plus one, where given, by block 0's thread 0: a reduction to
// memory, which holds no register afterwards (a load and store here spilled the block per channel on sm_90).
__device__ __forceinline__ void count_batch(int64_t* batches) {
  if (batches != nullptr && blockIdx.x == 0 && threadIdx.x == 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(batches), 1ull);
}

// A warp per channel merges the channel's `parts` pieces, writes the batch mean and biased variance, and
// updates the running statistics (when given). The merge is by sums alone, as block_summary's: the mean from
// the counts and count-weighted means, then M2 from each piece's M2 and its spread around that mean (a merge
// tree divides at every step, and a float64 division takes hundreds of cycles).
template <typename scalar_t>
__global__ void finalize_stats_kernel(const double* __restrict__ summary, int64_t parts, int64_t channels,
                                      typename Acc<scalar_t>::type* mean, typename Acc<scalar_t>::type* var,
                                      void* running_mean, void* running_var, bool running_fp32, double momentum,
                                      int64_t* batches) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  count_batch(batches);
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
    double momentum, typename Acc<scalar_t>::type* save_mean, typename Acc<scalar_t>::type* save_var,
    int64_t* batches) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[32];
  count_batch(batches);
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
  if (threadIdx.x == 0 && save_mean != nullptr) {
    save_mean[c] = acc_t(t.mean);
    save_var[c] = acc_t(t.m2 / t.n);
  }
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
    void* running_mean, void* running_var, bool running_fp32, double momentum,
    typename Acc<scalar_t>::type* save_mean, typename Acc<scalar_t>::type* save_var, int64_t* batches) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  __shared__ double scratch[CHANNEL_THREADS / 32 * GROUP_BYTES / 2];  // cols * VEC <= 16 channels
  count_batch(batches);
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
    if (threadIdx.x / cols == j) {
      if (running_mean != nullptr)
        store_running<scalar_t>(running_mean, running_var, running_fp32, c0 + j, old,
                                Summary<double>{double(rows), sum[j] * per_row, m2[j]}, momentum);
      if (save_mean != nullptr) {
        save_mean[c0 + j] = acc_t(sum[j] * per_row);
        save_var[c0 + j] = acc_t(m2[j] * per_row);
      }
    }
}


// The statistics kernels' grid: STATS_BLOCKS_PER_SM blocks per SM, so the whole tensor is read in one wave,
// each block summarising one piece of its channels.
struct StatsGrid {
  int vec;
  int64_t tx, ty, gx, parts, chunk;
};



StatsGrid stats_grid(const StatsLaunch& l) {
  const int64_t blocks = int64_t(sm_count()) * STATS_BLOCKS_PER_SM;
  const int vec = l.vec;
  if (!l.channels_last) {
    const int64_t units = l.numel / l.channels / vec;
    const int64_t parts = std::max<int64_t>(std::min(cdiv(blocks, l.channels), cdiv(units, STATS_THREADS * UNROLL)), 1);
    return {vec, STATS_THREADS, 1, l.channels, parts, cdiv(units, parts)};
  }
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
      l.running_var, l.running_fp32, l.momentum, l.batches);
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
  for (; threads > CHANNEL_THREADS / 4; threads /= 2)
    if (int64_t(blocks_per_sm(kernel, threads, shared)) * sm_count() >= channels) break;
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
      make_fast_div(uint32_t(plane_vecs)), l.running_mean, l.running_var, l.running_fp32, l.momentum,
      static_cast<typename Acc<scalar_t>::type*>(l.mean), static_cast<typename Acc<scalar_t>::type*>(l.var), l.batches);
  return cudaGetLastError();
}

// The vector widths a plan may give the block per channel: 16 bytes, 8, single elements.
template <typename scalar_t>
cudaError_t channel_typed(const StatsLaunch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  if (l.vec == VEC) return channel_launch<scalar_t, VEC>(l);
  if constexpr (VEC > 2) {
    if (l.vec == VEC / 2) return channel_launch<scalar_t, VEC / 2>(l);
  }
  return l.vec == 1 ? channel_launch<scalar_t, 1>(l) : cudaErrorInvalidValue;
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
      l.running_mean, l.running_var, l.running_fp32, l.momentum,
      static_cast<typename Acc<scalar_t>::type*>(l.mean), static_cast<typename Acc<scalar_t>::type*>(l.var), l.batches);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t channel_group_typed(const StatsLaunch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  return l.vec == VEC ? channel_group_launch<scalar_t, VEC>(l)
                      : l.vec == 1 ? channel_group_launch<scalar_t, 1>(l) : cudaErrorInvalidValue;
}

}  // namespace

int64_t stats_parts(const StatsLaunch& l) {
  return l.fused == Fused::Grid ? sm_count() : l.fused == Fused::Channel ? 0 : stats_grid(l).parts;
}
const char* stats_plan_error(const StatsLaunch& l) {
  const int64_t bytes = l.vec * int64_t(element_size(l.dtype));
  if (l.vec < 1 || bytes > VEC_BYTES || !aligned(l.x, bytes) || (l.fused != Fused::None && !aligned(l.y, bytes)))
    return "the plan's vectors need x (and y) aligned to their width";
  if (l.channels_last ? l.channels % l.vec != 0 : l.plane % l.vec != 0)
    return "the plan's vectors do not fit the planes or rows";
  if (l.fused == Fused::Grid && (l.dtype != DType::Float || l.vec != VEC_BYTES / 4 || l.channels_last ||
                                 l.numel / l.channels / l.vec > INT32_MAX))
    return "the persistent kernel needs float32 NCHW in 16-byte vectors, fewer than 2^31 of them per channel";
  if (l.fused == Fused::Grid && (l.mean != nullptr || l.batches != nullptr))
    return "the persistent kernel does not give the batch statistics nor count the batch";
  return nullptr;
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
