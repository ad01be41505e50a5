"""The CUDA backend's training forward with autograd, eager mode, as one bound call: it checks everything,
launches the forward (the read-once kernel, or the statistics and then an eval plan) and records the backward
as an autograd node in C++, the way PyTorch's own ops record theirs (a ``torch::autograd::Node`` with its saved
variables, as the generated ``CudnnBatchNormBackward0``): the backward runs the backward kernels with no Python
in between. torch.compile and the other backends keep ``functional._Train``."""

SOURCE = r"""
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

namespace {

// The node's edges are (x, weight, bias), an absent weight or bias an invalid edge; the engine asks only for
// the gradients some input needs (task_should_compute_output).
struct TrainBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x, mean, var, weight;
  bool has_weight = false, has_bias = false, channels_last = false;
  double eps = 0;
  std::string kernel;
  c10::ScalarType grad_dtype = at::kFloat;  // the parameters' (weight and bias share one), else the input's

  std::string name() const override { return "bn2d::BatchNormBackward"; }

  void release_variables() override {
    x.reset_data();
    mean.reset_data();
    var.reset_data();
    weight.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // A throw is the engine's to report; a launch the plan chose does not fail but for a broken GPU.
    TORCH_CHECK(!at::GradMode::is_enabled(), "bn2d: the BatchNorm backward is not differentiable (double "
                "backward, e.g. autograd.grad(..., create_graph=True) through it, is not supported)");
    const bool need_dx = task_should_compute_output(0), need_dweight = has_weight && task_should_compute_output(1),
               need_dbias = has_bias && task_should_compute_output(2);
    torch::autograd::variable_list out(3);
    if (!grads[0].defined() || !(need_dx || need_dweight || need_dbias)) return out;
    const at::Tensor x_ = x.unpack(), mean_ = mean.unpack(), var_ = var.unpack(), weight_ = weight.unpack();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // allocations and launches only
    const auto dy = grads[0].contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const auto options = x_.options().dtype(grad_dtype);
    c10::optional<at::Tensor> dx, dweight, dbias;
    if (need_dx) dx = at::empty_like(x_);
    if (need_dweight) dweight = at::empty({x_.size(1)}, options);
    if (need_dbias) dbias = at::empty({x_.size(1)}, options);
    const auto weight_given = has_weight ? c10::optional<at::Tensor>(weight_) : c10::nullopt;
    const std::string error = ::backward(dy, x_, mean_, var_, weight_given, eps, true, dx, dweight, dbias,
                                         channels_last, kernel);
    TORCH_CHECK(error.empty(), error);
    out[0] = dx.value_or(at::Tensor());
    out[1] = dweight.value_or(at::Tensor());
    out[2] = dbias.value_or(at::Tensor());
    return out;
  }
};

// Nodes are held by std::shared_ptr in earlier PyTorch and by c10::intrusive_ptr in later (2.14): an Edge's own
// pointer type says which.
constexpr bool SHARED_NODES = std::is_same_v<decltype(torch::autograd::Edge::function),
                                             std::shared_ptr<torch::autograd::Node>>;

template <typename T>
auto make_node() {
  if constexpr (SHARED_NODES) return std::make_shared<T>();
  else return c10::make_intrusive<T>();
}

}  // namespace

// Training mode, eager: y normalised with x's batch statistics, the running statistics updated, the batch count
// (a module's num_batches_tracked) incremented where given, and, where x,
// weight or bias needs a gradient, y's grad_fn the backward above, by the plans Python chose: `eval_plan` < 0
// one read-once kernel (vectors of `vec`), else the statistics (vectors of `vec`, `channels_last`) and then the
// packed eval plan (`max_blocks`: its grid cap, 0 none); the backward by `backward_kernel` on
// `backward_channels_last` memory. Every check comes before the first launch, so an error changes nothing.
// Returns y and an error message (y None then); nothing is thrown.
std::tuple<at::Tensor, std::string> train_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& count, double momentum, double eps, int64_t vec, bool channels_last,
    int64_t eval_plan, int64_t max_blocks, const std::string& backward_kernel, bool backward_channels_last) {
  try {
    if (auto error = check_io(x, x); !error.empty()) return {at::Tensor(), error};
    if (auto error = check_pair(x, weight, bias); !error.empty()) return {at::Tensor(), error};
    const at::Tensor none;
    const at::Tensor& w = weight.has_value() ? *weight : none;
    const at::Tensor& b = bias.has_value() ? *bias : none;
    for (const at::Tensor* t : {&x, &w, &b})
      if (t->defined() && t->_fw_grad(/*level=*/0).defined())
        return {at::Tensor(), "bn2d: forward-mode automatic differentiation is not supported"};
    const bool record = at::GradMode::is_enabled() && (x.requires_grad() || (w.defined() && w.requires_grad()) ||
                                                       (b.defined() && b.requires_grad()));
    at::Tensor y, mean, var;
    std::string error;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // allocations and launches only
      y = at::empty_like(x);
      mean = at::empty({x.size(1)}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
      var = at::empty_like(mean);
      error = eval_plan < 0 ? fused_training(x, y, weight, bias, running_mean, running_var, momentum, eps, true, vec,
                                             mean, var, count)
                            : batch_stats(x, mean, var, running_mean, running_var, momentum, channels_last, vec,
                                          count);
      if (error.empty() && eval_plan >= 0) error = normalize(x, y, weight, bias, mean, var, eps, eval_plan, max_blocks);
    }
    if (!error.empty()) return {at::Tensor(), error};
    if (record) {
      const auto node = make_node<TrainBackward>();
      node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
      node->x = torch::autograd::SavedVariable(x, false);
      node->mean = torch::autograd::SavedVariable(mean, false);
      node->var = torch::autograd::SavedVariable(var, false);
      node->weight = torch::autograd::SavedVariable(w, false);
      node->has_weight = w.defined();
      node->has_bias = b.defined();
      node->channels_last = backward_channels_last;
      node->eps = eps;
      node->kernel = backward_kernel;
      node->grad_dtype = w.defined() ? w.scalar_type() : b.defined() ? b.scalar_type() : x.scalar_type();
      torch::autograd::set_history(y, node);
    }
    return {y, ""};
  } catch (const std::exception& e) {  // out of memory: raised by Python
    return {at::Tensor(), std::string("bn2d: ") + e.what()};
  }
}
"""

FUNCTIONS = ["train_autograd"]
