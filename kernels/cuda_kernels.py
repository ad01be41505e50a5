"""The CUDA backend: every CUDA kernel of the project in one `load_inline` module.

The source below is the whole CUDA implementation. It is compiled once, on first use, into PyTorch's
extension cache; later processes load the cached library. Three kernels:

* ``nchw_kernel`` -- contiguous NCHW. A flat grid-stride loop over 16-byte vectors of the whole tensor,
  so a 7x7 or 1x1 plane costs no idle block. The channel of a vector is found with one division; inside a
  vector the channel advances when the plane ends, so any plane size keeps full-width accesses.
* ``channels_last_kernel`` -- NHWC (and NCHW with 1x1 planes, which is the same memory). A thread owns
  a fixed vector of channels, computes their scale and shift once, and walks down the rows.
* ``naive_kernel`` -- the study's starting point: one thread per element, 256 threads, a flat 32-bit
  index and ``(x - mean) / sqrt(var + eps)`` per element.
"""
import os
import sys
from typing import NamedTuple

import torch

CUDA_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {

// Every vector path loads and stores 16 bytes per thread per access; several accesses are in flight
// per thread before the first use (UNROLL) so that a warp keeps enough bytes outstanding.
constexpr int VEC_BYTES = 16;
constexpr int UNROLL = 4;

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Per-channel parameters. Each pair (mean, var) and (weight, bias) is float32 or the input's own dtype;
// weight and bias may be absent (affine=False).
struct Params {
  const void* weight;
  const void* bias;
  const void* mean;
  const void* var;
  bool affine_fp32;
  bool stats_fp32;
  double eps;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_param(const void* p, bool fp32, int64_t c, acc_t absent) {
  if (p == nullptr) return absent;
  return fp32 ? static_cast<acc_t>(static_cast<const float*>(p)[c])
              : static_cast<acc_t>(static_cast<const scalar_t*>(p)[c]);
}

template <typename acc_t> struct Affine { acc_t scale, shift; };

// y = x * scale + shift with scale = weight / sqrt(var + eps) and shift = bias - mean * scale.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Affine<acc_t> channel_affine(const Params& p, int64_t c) {
  const acc_t mean = load_param<scalar_t>(p.mean, p.stats_fp32, c, acc_t(0));
  const acc_t var = load_param<scalar_t>(p.var, p.stats_fp32, c, acc_t(1));
  const acc_t weight = load_param<scalar_t>(p.weight, p.affine_fp32, c, acc_t(1));
  const acc_t bias = load_param<scalar_t>(p.bias, p.affine_fp32, c, acc_t(0));
  const acc_t scale = weight * (acc_t(1) / sqrt(var + static_cast<acc_t>(p.eps)));
  return {scale, bias - mean * scale};
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Vec { scalar_t v[VEC]; };

// Contiguous NCHW viewed as a flat array of `numel` elements with planes of `plane` = H*W elements.
// index_t is 32-bit when the tensor allows it: the one division per vector is then cheap.
template <typename scalar_t, int VEC, typename index_t>
__global__ void nchw_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p,
                            index_t numel, index_t plane, index_t channels) {
  using acc_t = typename AccType<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const index_t nvec = numel / VEC;
  const index_t stride = index_t(gridDim.x) * blockDim.x * UNROLL;
  for (index_t base = index_t(blockIdx.x) * blockDim.x * UNROLL + threadIdx.x; base < nvec; base += stride) {
    vec_t in[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const index_t i = base + index_t(u) * blockDim.x;
      if (i < nvec) in[u] = reinterpret_cast<const vec_t*>(x)[i];
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const index_t i = base + index_t(u) * blockDim.x;
      if (i >= nvec) continue;
      const index_t first = i * VEC;
      const index_t row = first / plane;
      index_t pos = first - row * plane;
      index_t c = row % channels;
      Affine<acc_t> a = channel_affine<scalar_t, acc_t>(p, c);
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (pos == plane) {  // the vector crosses into the next plane
          pos = 0;
          c = (c + 1 == channels) ? 0 : c + 1;
          a = channel_affine<scalar_t, acc_t>(p, c);
        }
        out.v[j] = static_cast<scalar_t>(static_cast<acc_t>(in[u].v[j]) * a.scale + a.shift);
        ++pos;
      }
      reinterpret_cast<vec_t*>(y)[i] = out;
    }
  }
  // The last numel % VEC elements, one per thread of block 0.
  const index_t rest = nvec * VEC + threadIdx.x;
  if (blockIdx.x == 0 && rest < numel) {
    const Affine<acc_t> a = channel_affine<scalar_t, acc_t>(p, (rest / plane) % channels);
    y[rest] = static_cast<scalar_t>(static_cast<acc_t>(x[rest]) * a.scale + a.shift);
  }
}

// Rows of `channels` contiguous elements (NHWC). Thread (tx, ty) owns channels [c0, c0 + VEC) and
// visits rows ty, ty + rows_per_step, ...; its VEC scale/shift pairs stay in registers.
template <typename scalar_t, int VEC>
__global__ void channels_last_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const Params p,
                                     int64_t rows, int64_t channels) {
  using acc_t = typename AccType<scalar_t>::type;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= channels) return;
  Affine<acc_t> a[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) a[j] = channel_affine<scalar_t, acc_t>(p, c0 + j);
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t base = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; base < rows; base += step * UNROLL) {
    vec_t in[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t r = base + u * step;
      if (r < rows) in[u] = *reinterpret_cast<const vec_t*>(x + r * channels + c0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t r = base + u * step;
      if (r >= rows) continue;
      vec_t out;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out.v[j] = static_cast<scalar_t>(static_cast<acc_t>(in[u].v[j]) * a[j].scale + a[j].shift);
      *reinterpret_cast<vec_t*>(y + r * channels + c0) = out;
    }
  }
}

template <typename scalar_t>
__global__ void naive_kernel(const scalar_t* x, scalar_t* y, const Params p, int numel, int plane, int channels) {
  using acc_t = typename AccType<scalar_t>::type;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx < numel) {
    const int c = (idx / plane) % channels;
    const acc_t mean = load_param<scalar_t>(p.mean, p.stats_fp32, c, acc_t(0));
    const acc_t var = load_param<scalar_t>(p.var, p.stats_fp32, c, acc_t(1));
    const acc_t weight = load_param<scalar_t>(p.weight, p.affine_fp32, c, acc_t(1));
    const acc_t bias = load_param<scalar_t>(p.bias, p.affine_fp32, c, acc_t(0));
    const acc_t xhat = (static_cast<acc_t>(x[idx]) - mean) / sqrt(var + static_cast<acc_t>(p.eps));
    y[idx] = static_cast<scalar_t>(xhat * weight + bias);
  }
}

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

std::string check(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                  int64_t threads) {
  BN2D_REQUIRE(x.is_cuda() && x.dim() == 4, "the input must be a 4-D CUDA tensor");
  BN2D_REQUIRE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                   x.scalar_type() == at::kDouble, "the input must be float32, float16, bfloat16 or float64");
  BN2D_REQUIRE(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type() &&
                   y.device() == x.device(), "the output must have the input's shape, strides, dtype and device");
  BN2D_REQUIRE(x.size(1) <= INT32_MAX, "too many channels");
  BN2D_REQUIRE(threads >= 32 && threads <= 1024 && threads % 32 == 0,
               "threads per block must be a multiple of 32 in [32, 1024], got " + std::to_string(threads));
  if (auto error = check_pair(x, weight, bias); !error.empty()) return error;
  return check_pair(x, mean, var);
}

Params make_params(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& mean, const at::Tensor& var, double eps) {
  auto ptr = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; };
  const bool affine_fp32 = weight.has_value() ? weight->scalar_type() == at::kFloat
                                              : bias.has_value() && bias->scalar_type() == at::kFloat;
  return {ptr(weight), ptr(bias), mean.data_ptr(), var.data_ptr(), affine_fp32, mean.scalar_type() == at::kFloat, eps};
}

std::string launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : std::string("bn2d: kernel launch failed: ") + cudaGetErrorString(error);
}

bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % VEC_BYTES == 0; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t cap_blocks(int64_t blocks, int64_t max_blocks) {
  blocks = std::max<int64_t>(blocks, 1);
  return max_blocks > 0 ? std::min(blocks, max_blocks) : blocks;
}

template <typename scalar_t, int VEC, typename index_t>
void launch_nchw(const at::Tensor& x, at::Tensor& y, const Params& p, int64_t threads, int64_t max_blocks) {
  const int64_t numel = x.numel();
  const int64_t blocks = cap_blocks(std::min<int64_t>(cdiv(numel / VEC, threads * UNROLL), INT32_MAX), max_blocks);
  nchw_kernel<scalar_t, VEC, index_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p, numel, x.size(2) * x.size(3), x.size(1));
}

template <typename scalar_t, int VEC>
void launch_channels_last(const at::Tensor& x, at::Tensor& y, const Params& p, int64_t threads, int64_t max_blocks) {
  const int64_t channels = x.size(1);
  const int64_t rows = x.numel() / channels;
  // Threads along C cover one row's vectors (up to the block size); the rest of the block takes more rows.
  int64_t tx = 1;
  while (tx < cdiv(channels, VEC) && tx < threads) tx *= 2;
  const int64_t ty = std::max<int64_t>(threads / tx, 1);
  const int64_t gx = cdiv(cdiv(channels, VEC), tx);
  const int64_t gy = cap_blocks(std::min<int64_t>(cdiv(rows, ty * UNROLL), 65535), max_blocks > 0 ? cdiv(max_blocks, gx) : 0);
  channels_last_kernel<scalar_t, VEC><<<dim3(gx, gy), dim3(tx, ty), 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p, rows, channels);
}

}  // namespace

std::string nchw(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                 int64_t threads, bool vectorized, int64_t max_blocks) {
  if (auto error = check(x, y, weight, bias, mean, var, threads); !error.empty()) return error;
  BN2D_REQUIRE(x.is_contiguous(), "nchw expects a contiguous input");
  if (x.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  const Params p = make_params(weight, bias, mean, var, eps);
  const bool narrow = x.numel() < (int64_t(1) << 31);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn2d_nchw", [&] {
    constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
    if (vectorized && aligned(x) && aligned(y)) {
      narrow ? launch_nchw<scalar_t, VEC, uint32_t>(x, y, p, threads, max_blocks)
             : launch_nchw<scalar_t, VEC, int64_t>(x, y, p, threads, max_blocks);
    } else {
      narrow ? launch_nchw<scalar_t, 1, uint32_t>(x, y, p, threads, max_blocks)
             : launch_nchw<scalar_t, 1, int64_t>(x, y, p, threads, max_blocks);
    }
  });
  return launch_error();
}

std::string channels_last(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                          double eps, int64_t threads, bool vectorized, int64_t max_blocks) {
  if (auto error = check(x, y, weight, bias, mean, var, threads); !error.empty()) return error;
  BN2D_REQUIRE(x.is_contiguous(at::MemoryFormat::ChannelsLast), "channels_last expects a channels_last input");
  if (x.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  const Params p = make_params(weight, bias, mean, var, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn2d_channels_last", [&] {
    constexpr int VEC = VEC_BYTES / sizeof(scalar_t);
    if (vectorized && aligned(x) && aligned(y) && x.size(1) % VEC == 0) {
      launch_channels_last<scalar_t, VEC>(x, y, p, threads, max_blocks);
    } else {
      launch_channels_last<scalar_t, 1>(x, y, p, threads, max_blocks);
    }
  });
  return launch_error();
}

std::string naive(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps) {
  if (auto error = check(x, y, weight, bias, mean, var, 256); !error.empty()) return error;
  BN2D_REQUIRE(x.is_contiguous(), "naive expects a contiguous input");
  BN2D_REQUIRE(x.numel() <= INT32_MAX, "the naive kernel indexes with 32-bit ints and cannot address " +
                                           std::to_string(x.numel()) + " elements (at most 2^31 - 1)");
  if (x.numel() == 0) return "";
  const c10::cuda::CUDAGuard guard(x.device());
  const Params p = make_params(weight, bias, mean, var, eps);
  const int numel = static_cast<int>(x.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn2d_naive", [&] {
    naive_kernel<scalar_t><<<(numel + 255) / 256, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p, numel, static_cast<int>(x.size(2) * x.size(3)),
        static_cast<int>(x.size(1)));
  });
  return launch_error();
}
"""

# The host-side declarations of the bound functions, and the headers pybind11 needs for them.
CPP_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

// Each returns an error message, empty on success.
#define BN2D_SIGNATURE const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight, \
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps
std::string nchw(BN2D_SIGNATURE, int64_t threads, bool vectorized, int64_t max_blocks);
std::string channels_last(BN2D_SIGNATURE, int64_t threads, bool vectorized, int64_t max_blocks);
std::string naive(BN2D_SIGNATURE);
"""

FUNCTIONS = ["nchw", "channels_last", "naive"]


class CudaConfig(NamedTuple):
    """Launch parameters of the CUDA kernels (the naive kernel has fixed ones)."""

    threads: int = 256  # threads per block, a multiple of 32
    vectorized: bool = True  # 16-byte loads and stores where the pointers and sizes allow
    blocks_per_sm: int = 0  # 0: enough blocks for one pass over the tensor; k: a grid-stride grid of k per SM


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


def normalize(x, y, weight, bias, mean, var, eps: float, layout: str, config: CudaConfig):
    """y = x * scale[c] + shift[c] for `layout` in ("nchw", "channels_last", "naive"); x and y share strides."""
    m = module()
    if layout == "naive":
        error = m.naive(x, y, weight, bias, mean, var, eps)
    else:
        max_blocks = config.blocks_per_sm * _sm_count(x.device) if config.blocks_per_sm else 0
        error = getattr(m, layout)(x, y, weight, bias, mean, var, eps, config.threads, config.vectorized, max_blocks)
    if error:
        raise RuntimeError(error)


_sm_counts = {}


def _sm_count(device) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]
