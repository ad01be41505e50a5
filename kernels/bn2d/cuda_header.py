"""The CUDA module's shared header: the declarations both of its sides see (the input's dtype and the
per-channel parameters), and the device and host helpers every kernel file uses (dtype conversion, the
per-channel affine map, vectors, fast division, the launch helpers). ``cuda.py`` assembles it with the
kernel files into one ``load_inline`` module."""

# Seen by both sides: the .cu part and the C++ bindings.
DECLARATIONS = r"""
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

}  // namespace bn2d
"""

# The .cu part's prelude: no ATen header, so nvcc compiles it quickly.
DEVICE = r"""
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
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
// The largest block a config may ask for; the kernels are compiled to fit it (at most 64 registers). Not so
// channels_last_kernel: at that cap its bfloat16 instantiation spilled on sm_90 and took 1.4-6% longer than
// float16 on large tensors, so its blocks take at most 512 threads (experiments/NOTES.md, "bfloat16
// channels_last: a spill at the 64-register cap").
constexpr int MAX_THREADS = 1024, CHANNELS_LAST_MAX_THREADS = 512, FLAT_MAX_THREADS = 256;
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

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int element_size(DType dtype) {
  return dtype == DType::Double ? 8 : dtype == DType::Float ? 4 : 2;
}

int64_t cap_blocks(int64_t blocks, int64_t max_blocks) {
  blocks = std::max<int64_t>(blocks, 1);
  return max_blocks > 0 ? std::min(blocks, max_blocks) : blocks;
}

bool aligned(const void* p, size_t bytes = VEC_BYTES) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Threads along a row of `vectors` channel vectors: a power of two, at most a warp and at most `threads`.
int64_t row_threads(int64_t vectors, int64_t threads) {
  int64_t tx = 1;
  while (tx < vectors && tx < MAX_ROW_THREADS && tx < threads) tx *= 2;
  return tx;
}


// The CUDA runtime's queries about a device or a kernel (the occupancy query reads the kernel's attributes) are
// host time on every launch that asks them, and their answers never change: each is asked once per device (and
// kernel, block, shared memory) and kept. (Keeping them did not shorten the read-once bindings measurably on the
// H200: experiments/NOTES.md, "Where a layer's host time goes".) `Key` the question, `ask` the query.
template <typename Key, typename Ask>
int remembered(const Key& key, Ask ask) {
  static std::mutex mutex;
  static std::map<std::tuple<int, Key>, int> answers;
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = answers.find({device, key});
  if (found != answers.end()) return found->second;
  const int answer = ask();
  answers.emplace(std::make_tuple(device, key), answer);
  return answer;
}

int device_attribute(cudaDeviceAttr attribute) {
  return remembered(int(attribute), [&] {
    int device = 0, value = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&value, attribute, device);
    return value;
  });
}

template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t shared) {
  return remembered(std::make_tuple(reinterpret_cast<const void*>(kernel), threads, shared), [&] {
    int blocks = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared);
    return blocks;
  });
}

// Dynamic shared memory beyond the default 48 KB must be asked for (big blocks on 2- to 5-element planes): only
// when a kernel needs more than it holds on this device (a smaller ask would lower what it holds).
template <typename Kernel>
cudaError_t reserve_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*>, size_t> held;
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& reserved = held[{device, reinterpret_cast<const void*>(kernel)}];
  if (bytes <= reserved) return cudaSuccess;
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (error == cudaSuccess) reserved = bytes;
  return error;
}

int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

#define BN2D_DISPATCH(dtype, fn, l)                        \
  switch (dtype) {                                       \
    case DType::Float: return fn<float>(l);              \
    case DType::Half: return fn<__half>(l);              \
    case DType::BFloat16: return fn<__nv_bfloat16>(l);   \
    case DType::Double: return fn<double>(l);            \
  }                                                      \
  return cudaErrorInvalidValue


}  // namespace
}  // namespace bn2d
"""
