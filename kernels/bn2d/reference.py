"""The float64 reference every backend is checked against, and the error measure."""
import torch


def batch_norm_reference(x, mean, var, weight=None, bias=None, eps: float = 1e-5):
    """Eval-mode BatchNorm2d in float64, written from its definition."""
    shape = (1, -1, 1, 1)
    y = (x.double() - mean.double().view(shape)) / torch.sqrt(var.double().view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def batch_stats_reference(x):
    """Per-channel batch mean and biased variance in float64."""
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    return mean, var


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in `out` gives inf, so an unwritten element fails."""
    return _ratio([_squared_norms(out, ref)])


def batch_norm_error(y, x, mean, var, weight=None, bias=None, eps: float = 1e-5, rows: int = 256) -> float:
    """relative_error of y against the reference for x, in slices of H: the float64 copy of a whole large
    tensor need not fit."""
    return _ratio(_squared_norms(y[:, :, h:h + rows], batch_norm_reference(x[:, :, h:h + rows], mean, var, weight,
                                                                           bias, eps))
                  for h in range(0, x.size(2), rows))


def _squared_norms(out, ref):
    """(||out - ref||^2, ||ref||^2) in float64, or None when out holds a non-finite element."""
    out = out.double()
    if not torch.isfinite(out).all():
        return None
    return (out - ref).norm().item() ** 2, ref.norm().item() ** 2


def _ratio(parts) -> float:
    num = den = 0.0
    for part in parts:
        if part is None:
            return float("inf")
        num, den = num + part[0], den + part[1]
    return (num / (den if den > 0 else 1.0)) ** 0.5
