"""The CUDA backend's training forward with autograd, eager mode, as one bound call: it launches the forward
(the read-once kernel, or the statistics and then an eval plan) and records the backward as an autograd node in
C++ (``torch::autograd::Function``), so the backward runs the backward kernels with no Python in between, as
PyTorch's own BatchNorm does. (Measured on the H200, a layer's fwd+bwd host time went from 456 us through a
Python ``autograd.Function`` to 416 us this way, against nn.BatchNorm2d's 227: experiments/NOTES.md, where the
rest of the difference is still being looked for.) torch.compile and the other backends keep
``functional._Train``."""

SOURCE = r"""
#include <torch/csrc/autograd/custom_function.h>

namespace {

// What the forward made and chose, for the backward: y, the batch statistics, and the backward's plan.
struct TrainOutputs {
  at::Tensor y, mean, var;
  double eps;
  std::string backward_kernel;
  bool backward_channels_last;
};

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  // x, weight and bias are the node's inputs (an absent weight or bias is none); the rest is data.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            const TrainOutputs& out) {
    ctx->save_for_backward({x, out.mean, out.var, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["eps"] = out.eps;
    ctx->saved_data["kernel"] = out.backward_kernel;
    ctx->saved_data["channels_last"] = out.backward_channels_last;
    // The gradients' dtype: the parameters' (weight and bias share one), else the input's.
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["dtype"] = int64_t(weight.has_value() ? weight->scalar_type()
                                       : bias.has_value() ? bias->scalar_type() : x.scalar_type());
    return out.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // A throw is the engine's to report; a launch the plan chose does not fail but for a broken GPU.
    TORCH_CHECK(!at::GradMode::is_enabled(), "bn2d: the BatchNorm backward is not differentiable (double "
                "backward, e.g. autograd.grad(..., create_graph=True) through it, is not supported)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &var = saved[2], &weight = saved[3];
    const bool has_weight = weight.defined(), has_bias = ctx->saved_data["bias"].toBool();
    // Edges are the inputs present: x, then weight, then bias.
    const bool need_dx = ctx->needs_input_grad(0), need_dweight = has_weight && ctx->needs_input_grad(1),
               need_dbias = has_bias && ctx->needs_input_grad(1 + has_weight);
    const bool channels_last = ctx->saved_data["channels_last"].toBool();
    const auto dy = grads[0].contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const auto options = x.options().dtype(c10::ScalarType(ctx->saved_data["dtype"].toInt()));
    c10::optional<at::Tensor> dx, dweight, dbias;
    if (need_dx) dx = at::empty_like(x);
    if (need_dweight) dweight = at::empty({x.size(1)}, options);
    if (need_dbias) dbias = at::empty({x.size(1)}, options);
    if (need_dx || need_dweight || need_dbias) {
      const auto weight_given = has_weight ? c10::optional<at::Tensor>(weight) : c10::nullopt;
      const std::string error = ::backward(dy, x, mean, var, weight_given, ctx->saved_data["eps"].toDouble(), true,
                                           dx, dweight, dbias, channels_last, ctx->saved_data["kernel"].toStringRef());
      TORCH_CHECK(error.empty(), error);
    }
    return {dx.value_or(at::Tensor()), dweight.value_or(at::Tensor()), dbias.value_or(at::Tensor()), at::Tensor()};
  }
};

}  // namespace

// Training mode with autograd, eager: y normalised with x's batch statistics, the running statistics updated, and
// y's grad_fn the backward above, by the plans Python chose: `eval_plan` < 0 one read-once kernel (vectors of
// `vec`), else the statistics (vectors of `vec`, `channels_last`) and then the packed eval plan (`max_blocks`:
// its grid cap, 0 none); the backward by `backward_kernel` on `backward_channels_last` memory. Returns y and an
// error message (y None then); nothing is thrown.
std::tuple<at::Tensor, std::string> train_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, int64_t vec, bool channels_last, int64_t eval_plan, int64_t max_blocks,
    const std::string& backward_kernel, bool backward_channels_last) {
  try {
    TrainOutputs out{at::empty_like(x), {}, {}, eps, backward_kernel, backward_channels_last};
    out.mean = at::empty({x.size(1)}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    out.var = at::empty_like(out.mean);
    std::string error = eval_plan < 0 ? fused_training(x, out.y, weight, bias, running_mean, running_var, momentum,
                                                       eps, true, vec, out.mean, out.var)
                                      : batch_stats(x, out.mean, out.var, running_mean, running_var, momentum,
                                                    channels_last, vec);
    if (error.empty() && eval_plan >= 0)
      error = normalize(x, out.y, weight, bias, out.mean, out.var, eps, eval_plan, max_blocks);
    if (!error.empty()) return {at::Tensor(), error};
    return {TrainFunction::apply(x, weight, bias, out), ""};
  } catch (const std::exception& e) {  // out of memory: raised by Python
    return {at::Tensor(), std::string("bn2d: ") + e.what()};
  }
}
"""

FUNCTIONS = ["train_autograd"]
