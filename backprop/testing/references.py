"""The torch twin of each op, with the op's exact signature: the oracle's reference functions.
The op table (``backprop.testing.opinfo``) names each op's twin and, where its formula cancels,
its ``*_magnitude`` function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import backprop

Tensor = torch.Tensor


def cross_entropy(
    logits: Tensor, targets: Tensor, *, weight: Tensor | None = None, reduction: str = "mean",
    ignore_index: int = -100, label_smoothing: float = 0.0,
) -> Tensor:
    if weight is not None:
        weight = weight.to(logits.dtype)  # the oracle's float64 run casts the positional tensors only
    return F.cross_entropy(
        logits, targets, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def cross_entropy_magnitude(
    logits: Tensor, targets: Tensor, *, dout: Tensor, weight: Tensor | None = None,
    reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The size of the terms in dlogits = g (softmax S - qw), qw = w q, S = sum_c qw_c:
    |g| (softmax |S| + |qw|). When the prediction matches the target distribution
    (label_smoothing=1 on near-uniform logits) every entry is a cancellation, and rounding scales
    with these terms, not with the result."""
    eps = label_smoothing
    z = logits if logits.ndim >= 2 else logits[None]
    C = z.shape[1]
    z = z.movedim(1, -1).reshape(-1, C)  # (rows, C)
    w = weight.to(z.dtype) if weight is not None else z.new_ones(C)
    if targets.is_floating_point():
        q = targets if logits.ndim >= 2 else targets[None]
        q = q.movedim(1, -1).reshape(-1, C) * (1 - eps) + eps / C  # (rows, C)
        valid = torch.ones(q.shape[0], dtype=torch.bool)
        total = q.shape[0]
    else:
        y = targets.reshape(-1)  # (rows,)
        valid = y != ignore_index
        safe = torch.where(valid, y, 0)
        q = (F.one_hot(safe, C).to(z.dtype) * (1 - eps) + eps / C) * valid[:, None]
        total = (w[safe] * valid).sum().abs() if weight is not None else valid.sum()
    qw = (q * w).abs()
    g = dout.abs().reshape(-1) if reduction == "none" else dout.abs() / total
    terms = (torch.softmax(z, 1) * qw.sum(1, keepdim=True) + qw) * g.reshape(-1, 1) * valid[:, None]
    shape = (*(logits.shape[:1] + logits.shape[2:]), C) if logits.ndim >= 2 else (1, C)
    return {"dlogits": terms.reshape(shape).movedim(-1, 1).reshape(logits.shape)}


def batch_norm_magnitude(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, dout: Tensor,
    eps: float = 1e-5, correction: int = 0,
) -> dict[str, Tensor]:
    """The size of the terms in out = xhat w + b, dweight = sum(dout xhat) and
    dx = w rstd (dout - sum(dout) / N - xhat sum(dout xhat) / d), d = N - correction.
    When dout is an affine function of x (hypothesis drew x from dout's own stream) the three
    terms of dx cancel to O(eps / var), and the default stand-in (the reference run on |x| and
    |dout|) cancels with them, because it normalises |x| again; rounding scales with the terms."""
    N = x.shape[0]
    xc = x - x.mean(0)
    rstd = ((xc * xc).sum(0) / (N - correction) + eps).rsqrt()
    xhat = (xc * rstd).abs()
    a = dout.abs()
    w = weight.abs() if weight is not None else torch.ones_like(rstd)
    sizes = {
        "out": xhat * w + (bias.abs() if bias is not None else 0.0),
        "dx": w * rstd * (a + a.sum(0) / N + xhat * (a * xhat).sum(0) / (N - correction)),
    }
    if weight is not None:
        sizes["dweight"] = (a * xhat).sum(0)
    return sizes


def logsumexp(x: Tensor, *, dim: int | tuple[int, ...] = -1, keepdim: bool = False) -> Tensor:
    return torch.logsumexp(x, dim=dim, keepdim=keepdim)


def batch_norm_composed(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5,
    correction: int = 0,
) -> Tensor:
    """The makemore notebook's atoms: mean, diff, diff**2, var (1/(N - correction)), rsqrt."""
    mean = x.mean(0, keepdim=True)
    diff = x - mean
    var = (diff**2).sum(0, keepdim=True) / (x.shape[0] - correction)
    out = diff * (var + eps) ** -0.5
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def batch_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5,
    correction: int = 0,
) -> Tensor:
    """F.batch_norm in training mode for correction=0; the composed notebook ops otherwise
    (torch has no op for the Bessel-corrected case) and for N=1, which F.batch_norm refuses."""
    if correction == 0 and x.shape[0] > 1:
        if weight is None and bias is not None:
            # CUDA's native_batch_norm_backward returns an empty (or zero) bias gradient when
            # weight is None (docs/verification.md); a weight of ones is the same function
            weight = torch.ones_like(bias)
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    return batch_norm_composed(x, weight, bias, eps=eps, correction=correction)


def tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


def embedding(
    indices: Tensor, weight: Tensor, *, padding_idx: int | None = None, deterministic: bool = True
) -> Tensor:
    """deterministic changes only the order of summation on CUDA, not the value."""
    return F.embedding(indices, weight, padding_idx=padding_idx)


# for code that needs no hypothesis (the op table needs it): each op's twin by name
REFERENCES = {name: globals()[name] for name in backprop.OPS}
