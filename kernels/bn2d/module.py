"""``BatchNorm2d``: ``nn.BatchNorm2d`` with its forward on a chosen backend; ``BatchNormReLU2d`` and
``BatchNormAddReLU2d``, the same followed by a ReLU (after adding a residual); and ``convert``."""
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

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
        return self._batch_norm(input)

    def _batch_norm(self, input, activation=None, residual=None):
        """The module's batch_norm call, with the fused modules' epilogue."""
        try:  # from their dicts: nn.Module.__getattr__ costs ~0.5 us a read, more than the rest of eval's Python
            b, p = self._buffers, self._parameters
            running_mean, running_var, weight, bias = b["running_mean"], b["running_var"], p["weight"], p["bias"]
        except KeyError:  # a parametrization (torch.nn.utils.parametrize) made one of them a property
            running_mean, running_var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        if not self.training and running_mean is not None:  # eval with running statistics: the hot path
            return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, self.eps,
                              backend=self.backend, activation=activation, residual=residual)
        count = b.get("num_batches_tracked") if self.training and self.momentum is not None else None
        # Training with autograd's hot path: the kernels count the batch.
        if count is not None and self.backend == "cuda" and activation is None and residual is None:
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
            backend=self.backend, activation=activation, residual=residual,
        )


class BatchNormReLU2d(BatchNorm2d):
    """``relu(bn(x))`` as one module: a ``BatchNorm2d`` (same constructor, parameters, buffers and state_dict)
    whose output goes through a ReLU, what ``convert(model, fuse=True)`` makes of a BatchNorm2d and its ReLU."""

    def forward(self, input):
        return self._batch_norm(input, "relu")


class BatchNormAddReLU2d(BatchNorm2d):
    """``relu(bn(x) + residual)``, a residual block's end, as one module: ``forward(input, residual)``."""

    def forward(self, input, residual):
        return self._batch_norm(input, "relu", residual)


def convert(model: nn.Module, backend: str = "cuda", fuse: bool = False) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` of ``model`` for a ``BatchNorm2d`` on ``backend``, in place, sharing
    its parameters and buffers (so optimisers and state_dicts keep working). Returns the model, or the
    replacement if ``model`` itself is a BatchNorm2d.

    ``fuse=True`` first rewrites the model's graph (``torch.fx``): a BatchNorm2d whose output only a ReLU reads
    becomes a ``BatchNormReLU2d``, one whose output only an add reads, whose sum only a ReLU reads, a
    ``BatchNormAddReLU2d`` (nodes are matched, not module names: one ReLU module may serve several). Returns the
    rewritten ``torch.fx.GraphModule``, which shares the model's parameters and buffers and leaves the model as
    it was; where tracing fails, a warning says so and the BatchNorm2d layers are swapped unfused."""
    if fuse and not isinstance(model, nn.BatchNorm2d):
        model = _fused(model, backend)
    if isinstance(model, BatchNorm2d):
        model.backend = backend
        return model
    if isinstance(model, nn.BatchNorm2d):
        return _sharing(model, BatchNorm2d, backend)
    for name, child in model.named_children():
        setattr(model, name, convert(child, backend))
    return model


def _sharing(bn: nn.BatchNorm2d, cls, backend: str) -> BatchNorm2d:
    """A `cls` on `backend` with bn's parameters and buffers (the same tensors) and training mode."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
              backend=backend)
    new._parameters = bn._parameters
    new._buffers = bn._buffers
    new.train(bn.training)
    return new


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every BatchNorm2d (this project's too) a leaf of the graph."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def _fused(model: nn.Module, backend: str) -> nn.Module:
    """model's graph with BatchNorm2d -> ReLU and BatchNorm2d -> add -> ReLU as the fused modules."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # e.g. control flow that depends on a tensor's values
        warnings.warn(f"bn2d.convert(fuse=True): torch.fx could not trace {type(model).__name__} ({error}); its "
                      "BatchNorm2d layers are swapped unfused", stacklevel=3)
        return model
    traced = fx.GraphModule(model, graph)
    traced.training = model.training
    modules = dict(traced.named_modules())
    for node in list(graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if (type(bn) not in (nn.BatchNorm2d, BatchNorm2d) or len(node.users) != 1 or node.kwargs
                or len(node.args) != 1):
            continue
        user = next(iter(node.users))
        if _is_relu(user, modules):
            _set_submodule(traced, node.target, _sharing(bn, BatchNormReLU2d, backend))
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            continue
        other = _residual(user, node)
        relu = next(iter(user.users)) if other is not None and len(user.users) == 1 else None
        if relu is not None and _is_relu(relu, modules):
            _set_submodule(traced, node.target, _sharing(bn, BatchNormAddReLU2d, backend))
            with graph.inserting_before(user):  # where the residual exists (it may come after the BatchNorm)
                fused = graph.call_module(node.target, (node.args[0], other))
            relu.replace_all_uses_with(fused)
            for dead in (relu, user, node):
                graph.erase_node(dead)
    graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _residual(node: fx.Node, bn: fx.Node):
    """The other operand where `node` adds a tensor to bn's output (no alpha), else None."""
    adds = node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
    adds = adds or (node.op == "call_method" and node.target in ("add", "add_"))
    if not adds or node.kwargs or len(node.args) != 2 or bn not in node.args:
        return None
    other = node.args[1] if node.args[0] is bn else node.args[0]
    return other if isinstance(other, fx.Node) and other is not bn else None


def _set_submodule(root: nn.Module, target: str, module: nn.Module):
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
