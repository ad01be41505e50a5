"""The eval-mode kernels: normalisation with given statistics, ``y = x * scale[c] + shift[c]``.

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
* ``flat_kernel`` -- tensors whose vectors fit neither their planes nor their rows of channels (channels_last
  rows narrower than a vector, such as an RGB batch; small NCHW tensors whose vectors would straddle planes):
  a 16-byte vector per thread, each element's channel and scale and shift its own (L1 hits), the way
  torch.compile's kernel reads them.
* ``naive_kernel`` -- the study's starting point: one thread per element, 256 threads, a flat 32-bit
  index and ``(x - mean) / sqrt(var + eps)`` per element.
"""

DECLARATIONS = r"""
namespace bn2d {

// The eval kernels. Which one runs, with which vector width and block, is the plan's (dispatch.py): the
// launchers below check that a plan is safe for the tensors, then launch it.
enum class EvalKernel : int { Nchw, Small, ChannelsLast, SmallChannelsLast, Naive, Flat };

struct Launch {
  DType dtype;
  const void* x;
  void* y;
  Params params;
  int64_t numel, channels, plane;  // plane = H * W (flat_kernel on channels_last memory: 1)
  EvalKernel kernel;
  int vec;  // elements per vector access
  bool whole;  // NCHW: a plane is a whole number of vectors (else vectors straddle planes)
  bool long_planes;  // nchw_kernel: planes at least a tile long, so a tile needs no table
  int rows;  // small_channels_last_kernel: rows per thread
  int threads;  // per block
  int64_t max_blocks;  // 0: a block per tile, the tensor in one sweep
  cudaStream_t stream;
};

// Why `l` cannot run as planned (null: it can).
const char* eval_plan_error(const Launch& l);
cudaError_t launch_eval(const Launch& l);

}  // namespace bn2d
"""

KERNELS = r"""
namespace bn2d {
namespace {

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

// Either layout as a flat array whose element k is in channel (k / plane) % channels (plane 1 for
// channels_last): a vector per thread, as small_kernel, with a pair per element. 32-bit indices.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(FLAT_MAX_THREADS) flat_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                          const Params p, uint32_t numel, FastDiv plane_div,
                                                          uint32_t channels, FastDiv channel_div) {
  using acc_t = typename Acc<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const uint32_t i = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (i >= numel) return;
  const auto affine = [=](uint32_t k) {
    const uint32_t q = plane_div(k);
    return channel_affine<scalar_t, acc_t>(p, q - channel_div(q) * channels);
  };
  const auto normalized = [=](const vec_t in) {
    vec_t out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = apply(in.v[j], affine(min(i + j, numel - 1)));
    return out;
  };
  if (i + VEC > numel) {  // the partial last vector, on a path of its own (small_kernel's)
    vec_t in;
#pragma unroll
    for (int j = 0; j < VEC; ++j) in.v[j] = x[min(i + j, numel - 1)];
    const vec_t out = normalized(in);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (i + j < numel) y[i + j] = out.v[j];
    return;
  }
  *reinterpret_cast<vec_t*>(y + i) = normalized(*reinterpret_cast<const vec_t*>(x + i));
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


template <typename scalar_t, int VEC, bool WHOLE, bool LONG>
cudaError_t nchw_launch(const Launch& l) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t tile = int64_t(l.threads) * UNROLL * VEC;
  const int64_t blocks = cap_blocks(std::min<int64_t>(cdiv(l.numel, tile), INT32_MAX), l.max_blocks);
  // A tile of short planes touches at most tile / plane + 2 of them; one more entry is read (not used) past a
  // padded tail. Long planes use no table.
  const size_t shared = LONG ? 0 : size_t(tile / l.plane + 3) * sizeof(Affine<acc_t>);
  const auto kernel = nchw_kernel<scalar_t, VEC, WHOLE, LONG>;
  if (const cudaError_t error = reserve_shared(kernel, shared); error != cudaSuccess) return error;
  kernel<<<blocks, l.threads, shared, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, l.numel, l.plane,
      make_fast_div(uint32_t(std::min<int64_t>(l.plane, INT32_MAX))), l.channels, make_fast_div(uint32_t(l.channels)));
  return cudaGetLastError();
}

template <typename scalar_t, int VEC, bool STRADDLE>
cudaError_t small_launch(const Launch& l) {
  small_kernel<scalar_t, VEC, STRADDLE><<<cdiv(cdiv(l.numel, VEC), l.threads), l.threads, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, uint32_t(l.numel),
      uint32_t(l.plane), make_fast_div(uint32_t(l.plane)), uint32_t(l.channels), make_fast_div(uint32_t(l.channels)));
  return cudaGetLastError();
}

template <typename scalar_t, int VEC, bool WHOLE>
cudaError_t nchw_planned(const Launch& l) {
  if (l.kernel == EvalKernel::Small) return small_launch<scalar_t, VEC, !WHOLE>(l);
  return l.long_planes ? nchw_launch<scalar_t, VEC, WHOLE, true>(l) : nchw_launch<scalar_t, VEC, WHOLE, false>(l);
}

// The vector widths a plan may give NCHW: 16 bytes, 8 (whole planes only), single elements (whole).
template <typename scalar_t>
cudaError_t nchw_typed(const Launch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  if (l.vec == VEC) return l.whole ? nchw_planned<scalar_t, VEC, true>(l) : nchw_planned<scalar_t, VEC, false>(l);
  if constexpr (VEC > 2) {
    if (l.vec == VEC / 2 && l.whole) return nchw_planned<scalar_t, VEC / 2, true>(l);
  }
  if (l.vec == 1 && l.whole) return nchw_planned<scalar_t, 1, true>(l);
  return cudaErrorInvalidValue;
}

template <typename scalar_t, int VEC>
cudaError_t channels_last_launch(const Launch& l) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t rows = l.numel / l.channels;
  const int64_t vectors = cdiv(l.channels, VEC);
  const int64_t tx = row_threads(vectors, l.threads);
  const int64_t ty = std::max<int64_t>(l.threads / tx, 1);
  const int64_t gx = cdiv(vectors, tx);
  const int64_t gy = cap_blocks(std::min<int64_t>(cdiv(rows, ty * UNROLL), 65535), l.max_blocks > 0 ? cdiv(l.max_blocks, gx) : 0);
  const size_t shared = size_t(tx * VEC) * sizeof(Affine<acc_t>);
  channels_last_kernel<scalar_t, VEC><<<dim3(gx, gy), dim3(tx, ty), shared, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, rows, l.channels);
  return cudaGetLastError();
}

template <typename scalar_t, int VEC, int ROWS>
cudaError_t small_channels_last_launch(const Launch& l) {
  const int64_t vectors = l.channels / VEC, units = vectors * cdiv(l.numel / l.channels, ROWS);
  small_channels_last_kernel<scalar_t, VEC, ROWS><<<cdiv(units, l.threads), l.threads, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, uint32_t(l.numel / l.channels),
      uint32_t(vectors), make_fast_div(uint32_t(vectors)));
  return cudaGetLastError();
}

// The (vector width, rows per thread) pairs a plan may give channels_last's small kernel: a 16-byte vector of
// four rows, single elements of one row, and for 16-bit types half a vector of two rows.
template <typename scalar_t>
cudaError_t small_channels_last_typed(const Launch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  if (l.vec == VEC && l.rows == 4) return small_channels_last_launch<scalar_t, VEC, 4>(l);
  if (l.vec == 1 && l.rows == 1) return small_channels_last_launch<scalar_t, 1, 1>(l);
  if constexpr (sizeof(scalar_t) == 2) {
    if (l.vec == VEC / 2 && l.rows == 2) return small_channels_last_launch<scalar_t, VEC / 2, 2>(l);
  }
  return cudaErrorInvalidValue;
}

template <typename scalar_t, int VEC>
cudaError_t flat_launch(const Launch& l) {
  flat_kernel<scalar_t, VEC><<<cdiv(cdiv(l.numel, VEC), l.threads), l.threads, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, uint32_t(l.numel),
      make_fast_div(uint32_t(l.plane)), uint32_t(l.channels), make_fast_div(uint32_t(l.channels)));
  return cudaGetLastError();
}

// The vector widths a plan may give the flat kernel: 16 bytes, and for 16-bit types 8.
template <typename scalar_t>
cudaError_t flat_typed(const Launch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  if constexpr (sizeof(scalar_t) == 2) {
    if (l.vec == VEC / 2) return flat_launch<scalar_t, VEC / 2>(l);
  }
  return l.vec == VEC ? flat_launch<scalar_t, VEC>(l) : cudaErrorInvalidValue;
}

template <typename scalar_t>
cudaError_t naive_typed(const Launch& l) {
  const int numel = int(l.numel);
  naive_kernel<scalar_t><<<(numel + 255) / 256, 256, 0, l.stream>>>(
      static_cast<const scalar_t*>(l.x), static_cast<scalar_t*>(l.y), l.params, numel, int(l.plane), int(l.channels));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t eval_typed(const Launch& l) {
  constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
  switch (l.kernel) {
    case EvalKernel::Nchw:
    case EvalKernel::Small: return nchw_typed<scalar_t>(l);
    case EvalKernel::ChannelsLast:
      return l.vec == VEC ? channels_last_launch<scalar_t, VEC>(l)
                          : l.vec == 1 ? channels_last_launch<scalar_t, 1>(l) : cudaErrorInvalidValue;
    case EvalKernel::SmallChannelsLast: return small_channels_last_typed<scalar_t>(l);
    case EvalKernel::Naive: return naive_typed<scalar_t>(l);
    case EvalKernel::Flat: return flat_typed<scalar_t>(l);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

const char* eval_plan_error(const Launch& l) {
  const int64_t element = element_size(l.dtype), bytes = l.vec * element;
  const bool nchw = l.kernel == EvalKernel::Nchw || l.kernel == EvalKernel::Small;
  const bool small = l.kernel == EvalKernel::Small || l.kernel == EvalKernel::SmallChannelsLast ||
                     l.kernel == EvalKernel::Flat;
  if (l.kernel == EvalKernel::Naive) return l.numel <= INT32_MAX ? nullptr : "the naive kernel indexes in 32 bits";
  const int max_threads = l.kernel == EvalKernel::ChannelsLast ? CHANNELS_LAST_MAX_THREADS
                          : l.kernel == EvalKernel::Flat       ? FLAT_MAX_THREADS
                                                               : MAX_THREADS;
  if (l.threads < 32 || l.threads > max_threads ||
      l.threads % 32)
    return "threads per block must be a multiple of 32 the kernel's launch bounds allow";
  if (l.vec < 1 || bytes > VEC_BYTES || !aligned(l.x, bytes) || !aligned(l.y, bytes))
    return "the plan's vectors need x and y aligned to their width";
  if (nchw && (l.whole ? l.plane % l.vec != 0 : small && l.plane < l.vec))
    return "the plan's vectors do not fit the planes";
  if (nchw && l.long_planes && l.plane < int64_t(l.threads) * UNROLL * l.vec) return "planes shorter than a tile";
  if (!nchw && l.kernel != EvalKernel::Flat && l.channels % l.vec != 0) return "the plan's vectors do not fit the rows of channels";
  if (small && l.numel >= (int64_t(1) << 31)) return "the small-tensor kernels index in 32 bits";
  if (l.kernel == EvalKernel::SmallChannelsLast) {
    const Params& p = l.params;
    const size_t affine = l.vec * (p.affine_fp32 ? 4 : element), stats = l.vec * (p.stats_fp32 ? 4 : element);
    if (!aligned(p.weight, affine) || !aligned(p.bias, affine) || !aligned(p.mean, stats) || !aligned(p.var, stats))
      return "the small channels_last kernel loads the per-channel tensors as vectors, which must be aligned";
  }
  return nullptr;
}

cudaError_t launch_eval(const Launch& l) { BN2D_DISPATCH(l.dtype, eval_typed, l); }

}  // namespace bn2d
"""
