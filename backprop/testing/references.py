"""The torch twin of each op, with the op's exact signature: the oracle's reference functions.
The op table (``backprop.testing.opinfo``) names each op's twin and, where its formula cancels,
its ``*_magnitude`` function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import backprop

Tensor = torch.Tensor


def cross_entropy(
    logits: Tensor, targets: Tensor, *, reduction: str = "mean", ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    return F.cross_entropy(
        logits, targets, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def cross_entropy_magnitude(
    logits: Tensor, targets: Tensor, *, dout: Tensor, reduction: str = "mean", ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The size of the terms in dlogits = w (softmax - q): w (softmax + q). When the prediction
    matches the target distribution (label_smoothing=1 on near-uniform logits) every entry is a
    cancellation, and rounding scales with these terms, not with the result."""
    N, C = logits.shape
    valid = targets != ignore_index
    q = torch.zeros_like(logits)
    q[valid] = F.one_hot(targets[valid], C).to(logits.dtype) * (1 - label_smoothing)
    q = (q + label_smoothing / C) * valid[:, None]
    w = dout.abs().expand(N) if reduction != "mean" else (dout.abs() / valid.sum().clamp(min=1)).expand(N)
    return {"dlogits": (torch.softmax(logits, 1) + q) * w[:, None]}


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
