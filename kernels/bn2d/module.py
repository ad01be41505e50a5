"""``BatchNorm2d``: ``nn.BatchNorm2d`` with its forward on a chosen backend, and ``convert``."""
from torch import nn

from . import functional
from .functional import BACKENDS, batch_norm


class BatchNorm2d(nn.BatchNorm2d):
    """A drop-in ``nn.BatchNorm2d`` (same constructor, parameters, buffers and state_dict) whose forward
    runs on ``backend``: ``"cuda"``, ``"cuda_naive"``, ``"triton"`` or ``"torch"``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, backend="cuda"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.backend = backend

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(self, input):
        try:  # from their dicts: nn.Module.__getattr__ costs ~0.5 us a read, more than the rest of eval's Python
            b, p = self._buffers, self._parameters
            running_mean, running_var, weight, bias = b["running_mean"], b["running_var"], p["weight"], p["bias"]
        except KeyError:  # a parametrization (torch.nn.utils.parametrize) made one of them a property
            running_mean, running_var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        if not self.training and running_mean is not None:  # eval with running statistics: the hot path
            return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, self.eps,
                              backend=self.backend)
        count = b.get("num_batches_tracked") if self.training and self.momentum is not None else None
        if count is not None and self.backend == "cuda":  # training with autograd's hot path: the kernels count
            y = functional._cuda_train_hot(input, weight, bias, running_mean, running_var, self.momentum, self.eps,
                                           count)
            if y is not None:
                return y
        self._check_input_dim(input)
        # The momentum and num_batches_tracked bookkeeping of nn.BatchNorm2d.forward, line for line.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm(
            input,
            running_mean if use_running else None,
            running_var if use_running else None,
            weight, bias, use_batch_stats, factor, self.eps,
            backend=self.backend,
        )


def convert(model: nn.Module, backend: str = "cuda") -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` of ``model`` for a ``BatchNorm2d`` on ``backend``, in place, sharing
    its parameters and buffers (so optimisers and state_dicts keep working). Returns the model, or the
    replacement if ``model`` itself is a BatchNorm2d."""
    if isinstance(model, BatchNorm2d):
        model.backend = backend
        return model
    if isinstance(model, nn.BatchNorm2d):
        new = BatchNorm2d(model.num_features, model.eps, model.momentum, model.affine,
                          model.track_running_stats, device="meta", backend=backend)
        new._parameters = model._parameters
        new._buffers = model._buffers
        new.train(model.training)
        return new
    for name, child in model.named_children():
        setattr(model, name, convert(child, backend))
    return model
