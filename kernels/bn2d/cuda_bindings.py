"""The CUDA module's C++ side: checks, dtypes, the current stream and device, and the bound functions
(``FUNCTIONS``). It launches what Python tells it and returns an error message instead of raising."""

SOURCE = r"""
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
                  const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var) {
  if (auto error = check_io(x, y); !error.empty()) return error;
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

// An eval plan as Python packs it into one integer (dispatch.py, `_pack`), so that the hot path converts one
// argument: kernel in bits 0-3, vector width 4-8, whole planes 9, long planes 10, rows per thread 11-14,
// threads per block from bit 15.
bn2d::Launch unpack(int64_t plan) {
  bn2d::Launch l{};
  l.kernel = static_cast<bn2d::EvalKernel>(plan & 15);
  l.vec = int(plan >> 4 & 31);
  l.whole = plan >> 9 & 1;
  l.long_planes = plan >> 10 & 1;
  l.rows = int(plan >> 11 & 15);
  l.threads = int(plan >> 15);
  return l;
}

// Checks, then runs the eval plan on x's device and current stream.
std::string run(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                int64_t plan, int64_t max_blocks) {
  if (auto error = check(x, y, weight, bias, mean, var); !error.empty()) return error;
  if (x.numel() == 0) return "";
  bn2d::Launch l = unpack(plan);
  const bool nchw = l.kernel == bn2d::EvalKernel::Nchw || l.kernel == bn2d::EvalKernel::Small ||
                    l.kernel == bn2d::EvalKernel::Naive || (l.kernel == bn2d::EvalKernel::Flat && x.is_contiguous());
  BN2D_REQUIRE(nchw ? x.is_contiguous() : x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.size(2) * x.size(3) == 1,
               "the plan's kernel reads another memory layout than the input's");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool stats_fp32 = mean.scalar_type() == at::kFloat;
  l.dtype = dtype_of(x);
  l.x = x.data_ptr();
  l.y = y.data_ptr();
  l.params = params_of(weight, bias, mean, mean.data_ptr(), var.data_ptr(), stats_fp32, eps);
  l.numel = x.numel();
  l.channels = x.size(1);
  l.plane = nchw ? x.size(2) * x.size(3) : 1;  // the channels_last kernels read rows of channels
  l.max_blocks = max_blocks;
  l.stream = c10::cuda::getCurrentCUDAStream().stream();
  if (const char* error = bn2d::eval_plan_error(l)) return std::string("bn2d: ") + error;
  return launch_error(bn2d::launch_eval(l));
}

// Checks training mode's arguments, then runs `launch` (its other fields filled in from them) with its
// workspace, three doubles per channel per piece, on x's device and current stream.
std::string run_training(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                         const c10::optional<at::Tensor>& running_var, double momentum, bool channels_last,
                         int64_t vec, const c10::optional<at::Tensor>& count, bn2d::StatsLaunch& launch) {
  if (auto error = check_pair(x, running_mean, running_var); !error.empty()) return error;
  BN2D_REQUIRE(running_mean.has_value() == running_var.has_value(), "give both running statistics or neither");
  BN2D_REQUIRE(!count.has_value() || (count->scalar_type() == at::kLong && count->numel() == 1 &&
                                      count->device() == x.device()),
               "the batch count must be one int64 on the input's device");
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
  launch.vec = int(vec);
  launch.running_mean = running_mean.has_value() ? running_mean->data_ptr() : nullptr;
  launch.running_var = running_var.has_value() ? running_var->data_ptr() : nullptr;
  launch.running_fp32 = running_mean.has_value() && running_mean->scalar_type() == at::kFloat;
  launch.momentum = momentum;
  launch.batches = count.has_value() ? count->data_ptr<int64_t>() : nullptr;
  launch.stream = c10::cuda::getCurrentCUDAStream().stream();
  if (const char* error = bn2d::stats_plan_error(launch)) return std::string("bn2d: ") + error;
  at::Tensor summary;  // none for a block per channel or group (an empty allocation is host time of its own)
  if (const int64_t parts = bn2d::stats_parts(launch); parts > 0) {
    summary = at::empty({3 * parts * x.size(1)}, x.options().dtype(at::kDouble));
    launch.summary = summary.data_ptr<double>();
  }
  return launch_error(bn2d::launch_stats(launch));
}

}  // namespace

// Eval mode: y = x normalised with the given statistics, by `plan` (dispatch.py).
std::string normalize(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                      double eps, int64_t plan, int64_t max_blocks) {
  return run(x, y, weight, bias, mean, var, eps, plan, max_blocks);
}

// Eval mode's hot path in one bound call, the output allocated here: the fewest arguments to convert from
// Python (a call's host time, not the GPU's, is what a small tensor costs). Contiguous NCHW or channels_last x,
// default launch parameters. Returns None whenever anything is off -- a failed check, another layout, an empty
// input, an input that needs a gradient, no statistics, a failed allocation or launch -- and the caller then
// takes the general path, which handles the case or says what is wrong.
at::Tensor eval_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mean,
                        const c10::optional<at::Tensor>& var, double eps, int64_t plan) {
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
  return run(x, y, weight, bias, *mean, *var, eps, plan, 0).empty() ? y : at::Tensor();
}

// Training mode: the batch mean and biased variance of each channel of x into `mean` and `var` (float32,
// float64 for float64 input), the running statistics updated in place and the batch count (a module's
// num_batches_tracked) incremented (each when given).
std::string batch_stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var,
                        const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                        double momentum, bool channels_last, int64_t vec, const c10::optional<at::Tensor>& count) {
  if (auto error = check_io(x, x); !error.empty()) return error;
  if (auto error = check_pair(x, mean, var); !error.empty()) return error;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  BN2D_REQUIRE(mean.scalar_type() == acc && var.scalar_type() == acc,
               "batch mean and variance must be float32 (float64 for float64 input)");
  bn2d::StatsLaunch launch{};
  launch.mean = mean.data_ptr();
  launch.var = var.data_ptr();
  return run_training(x, running_mean, running_var, momentum, channels_last, vec, count, launch);
}

// Training mode in one kernel that reads x from device memory once: y normalised with the batch statistics,
// and the running statistics updated (when given). `per_channel`: a block per channel of contiguous NCHW, or
// per channel group of channels_last (the channel or group must fit in a block's shared memory); else the
// persistent grid (contiguous NCHW, float32 in 16-byte vectors). `vec`: elements per vector access. The batch
// mean and biased variance into `mean` and `var` where given (float32, float64 for float64 input; a block per
// channel or group only), and the batch count incremented where given (a block per channel or group only).
std::string fused_training(const at::Tensor& x, at::Tensor& y, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                           const c10::optional<at::Tensor>& running_var, double momentum, double eps,
                           bool per_channel, int64_t vec, const c10::optional<at::Tensor>& mean,
                           const c10::optional<at::Tensor>& var, const c10::optional<at::Tensor>& count) {
  if (auto error = check_io(x, y); !error.empty()) return error;
  if (auto error = check_pair(x, weight, bias); !error.empty()) return error;
  if (auto error = check_pair(x, mean, var); !error.empty()) return error;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  BN2D_REQUIRE(mean.has_value() == var.has_value() && (!mean.has_value() || (mean->scalar_type() == acc &&
                                                                             var->scalar_type() == acc)),
               "batch mean and variance: both or neither, float32 (float64 for float64 input)");
  const bool channels_last = !x.is_contiguous();
  BN2D_REQUIRE(!channels_last || (per_channel && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
               "fused_training takes a contiguous (NCHW) input, or a channels_last one for a block per channel");
  bn2d::StatsLaunch launch{};
  launch.y = y.data_ptr();
  launch.params = params_of(weight, bias, x, nullptr, nullptr, x.scalar_type() == at::kFloat, eps);
  launch.fused = per_channel ? bn2d::Fused::Channel : bn2d::Fused::Grid;
  launch.mean = mean.has_value() ? mean->data_ptr() : nullptr;
  launch.var = var.has_value() ? var->data_ptr() : nullptr;
  return run_training(x, running_mean, running_var, momentum, channels_last, vec, count, launch);
}
"""

FUNCTIONS = ["normalize", "eval_forward", "batch_stats", "fused_training"]
