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
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def batch_norm_error(y, x, mean, var, weight=None, bias=None, eps: float = 1e-5, rows: int = 256) -> float:
    """relative_error of y against the reference for x, in slices of H: the float64 copy of a whole large
    tensor need not fit."""
    num = den = 0.0
    for h in range(0, x.size(2), rows):
        ref = batch_norm_reference(x[:, :, h:h + rows], mean, var, weight, bias, eps)
        out = y[:, :, h:h + rows].double()
        if not torch.isfinite(out).all():
            return float("inf")
        num += (out - ref).norm().item() ** 2
        den += ref.norm().item() ** 2
    return (num / den) ** 0.5 if den > 0 else num ** 0.5
