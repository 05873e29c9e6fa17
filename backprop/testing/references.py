"""The torch twin of each op, with the op's exact signature: the oracle's reference functions.
The op table (``backprop.testing.opinfo``) names each op's twin and, where its formula cancels,
its ``*_magnitude`` function."""

from __future__ import annotations

import math

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
    eps: float = 1e-5, correction: int = 0, running_mean: Tensor | None = None,
    running_var: Tensor | None = None, training: bool = True, **_: object,
) -> dict[str, Tensor]:
    """The size of the terms in out = xhat w + b, dweight = sum(dout xhat) and
    dx = w rstd (dout - sum(dout) / n - xhat sum(dout xhat) / d), d = n - correction, per channel.
    When dout is an affine function of x (hypothesis drew x from dout's own stream) the three
    terms of dx cancel to O(eps / var), and the default stand-in (the reference run on |x| and
    |dout|) cancels with them, because it normalises |x| again; rounding scales with the terms.
    Eval mode: xhat = (x - running_mean) rstd cancels where x is near running_mean."""
    dims = (0, *range(2, x.ndim))
    bc = lambda v: v.reshape(1, -1, *[1] * (x.ndim - 2))  # noqa: E731 (C,) against (N, C, *)
    n = x.shape[0] * math.prod(x.shape[2:])  # values per channel
    a = dout.abs()
    if training:
        xc = x - bc(x.mean(dims))
        rstd = ((xc * xc).sum(dims) / (n - correction) + eps).rsqrt()
        xhat = (xc * bc(rstd)).abs()
    else:
        rstd = (running_var.double() + eps).rsqrt()
        xhat = (x.abs() + bc(running_mean.double().abs())) * bc(rstd)
    w = weight.abs() if weight is not None else torch.ones_like(rstd)
    sizes = {"out": xhat * bc(w) + (bc(bias.abs()) if bias is not None else 0.0)}
    if training:
        sizes["dx"] = bc(w * rstd) * (a + bc(a.sum(dims) / n)
                                      + xhat * bc((a * xhat).sum(dims) / (n - correction)))
    if weight is not None:
        sizes["dweight"] = (a * xhat).sum(dims)
    return sizes


def logsumexp(x: Tensor, *, dim: int | tuple[int, ...] = -1, keepdim: bool = False) -> Tensor:
    return torch.logsumexp(x, dim=dim, keepdim=keepdim)


def batch_norm_composed(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *,
    running_mean: Tensor | None = None, running_var: Tensor | None = None, training: bool = True,
    momentum: float | None = 0.1, eps: float = 1e-5, correction: int = 0, num_batches_tracked: int = 0,
) -> Tensor:
    """The makemore notebook's atoms: mean, diff, diff**2, var (1/(n - correction)), rsqrt, per
    channel over every dim but 1. Eval mode: the running statistics. The output only: running
    statistics are not updated. An empty 1-D x is read as (0, 0), as backprop.batch_norm reads it."""
    if x.ndim == 1:
        return batch_norm_composed(x.reshape(0, 0), weight, bias, running_mean=running_mean,
                                   running_var=running_var,
                                   training=training, eps=eps, correction=correction).reshape(x.shape)
    dims = (0, *range(2, x.ndim))
    bc = lambda v: v.reshape(1, -1, *[1] * (x.ndim - 2))  # noqa: E731 (C,) against (N, C, *)
    if training:
        n = x.shape[0] * math.prod(x.shape[2:])  # values per channel
        mean = x.mean(dims, keepdim=True)
        diff = x - mean
        var = (diff**2).sum(dims, keepdim=True) / (n - correction)
    else:
        diff, var = x - bc(running_mean.to(x.dtype)), bc(running_var.to(x.dtype))
    out = diff * (var + eps) ** -0.5
    if weight is not None:
        out = out * bc(weight)
    if bias is not None:
        out = out + bc(bias)
    return out


def batch_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *,
    running_mean: Tensor | None = None, running_var: Tensor | None = None, training: bool = True,
    momentum: float | None = 0.1, eps: float = 1e-5, correction: int = 0, num_batches_tracked: int = 0,
) -> Tensor:
    """F.batch_norm for correction=0 (on copies of the running statistics: torch updates them in
    place, and the output does not depend on the update); the composed notebook ops otherwise
    (torch has no op for the Bessel-corrected case) and for one value per channel, which
    F.batch_norm refuses in training."""
    n = x.shape[0] * math.prod(x.shape[2:]) if x.ndim > 1 else 0  # values per channel
    if not training or (correction == 0 and n != 1):
        if weight is None and bias is not None:
            # CUDA's native_batch_norm_backward returns an empty (or zero) bias gradient when
            # weight is None (docs/verification.md); a weight of ones is the same function
            weight = torch.ones_like(bias)
        # in x's dtype: the oracle runs the reference in float64 too, and casts only the positional args
        stats = [None if t is None else t.detach().to(x.dtype, copy=True) for t in (running_mean, running_var)]
        return F.batch_norm(x, *stats, weight, bias, training=training,
                            momentum=0.1 if momentum is None else momentum, eps=eps)
    return batch_norm_composed(x, weight, bias, eps=eps, correction=correction)


def tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


def embedding(
    indices: Tensor, weight: Tensor, *, padding_idx: int | None = None, max_norm: float | None = None,
    norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False, deterministic: bool = True,
) -> Tensor:
    """deterministic changes only the order of summation on CUDA, not the value."""
    return F.embedding(indices, weight, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                       scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)



def linear_cross_entropy(
    x: Tensor, linear_weight: Tensor, targets: Tensor, linear_bias: Tensor | None = None, *,
    weight: Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
    label_smoothing: float = 0.0, chunk_size: int | None = None,
) -> Tensor:
    """F.linear_cross_entropy on its reference path (options=None: F.cross_entropy(F.linear(...))).
    chunk_size changes only the order of summation. The oracle casts the positional tensors to
    float64 for its reference run; the class weights follow x's dtype, as F.cross_entropy requires."""
    return F.linear_cross_entropy(
        x, linear_weight, targets, linear_bias=linear_bias,
        weight=None if weight is None else weight.to(x.dtype), reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing,
    )


def linear_cross_entropy_magnitude(
    x: Tensor, linear_weight: Tensor, targets: Tensor, linear_bias: Tensor | None = None, *,
    dout: Tensor, weight: Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
    label_smoothing: float = 0.0, chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """The size of the terms in dz = g (a p - q) (see backprop/linear_cross_entropy.py), g (a p + q),
    plus what the logits' own rounding (size |x| |W|.T + |b|) carries into g a p; then through the
    matmuls dx = dz @ W, dW = dz.T @ x, db = dz.sum(0) with Higham's |A||B|. dz cancels in every
    entry when p matches q (label_smoothing=1 on near-uniform logits)."""
    V = linear_weight.shape[0]
    eps = label_smoothing
    w = weight.to(x.dtype) if weight is not None else torch.ones(V, dtype=x.dtype)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    q = (eps / V) * w.expand(x.shape[0], V).clone()
    q[torch.arange(x.shape[0]), safe] += (1 - eps) * w[safe]
    q = q * valid[:, None]
    a = q.sum(1, keepdim=True)
    z = F.linear(x, linear_weight, linear_bias)
    size = x.abs() @ linear_weight.abs().T + (linear_bias.abs() if linear_bias is not None else 0.0)
    g = dout.abs() if reduction != "mean" else dout.abs() / (w[safe] * valid).sum().abs().clamp(min=1e-300)
    g = g.expand(x.shape[0])[:, None] * valid[:, None]
    p = torch.softmax(z, 1)
    terms = g * (a * p * (1 + size) + q)  # (N, V)
    lse = torch.logsumexp(z, 1, keepdim=True)
    row = (q * (lse.abs() + z.abs() + size)).sum(1)  # (N,) loss_n = sum_c q[c] (lse - z_c)
    r = 1 / (w[safe] * valid).sum().abs().clamp(min=1e-300) if reduction == "mean" else 1.0
    sizes = {"out": row if reduction == "none" else (row * r).sum(),
             "dx": terms @ linear_weight.abs(), "dlinear_weight": terms.T @ x.abs()}
    if linear_bias is not None:
        sizes["dlinear_bias"] = terms.sum(0)
    return sizes

# for code that needs no hypothesis (the op table needs it): each op's twin by name
REFERENCES = {name: globals()[name] for name in backprop.OPS}
