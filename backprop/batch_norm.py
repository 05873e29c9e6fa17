"""batch_norm: training-mode batch normalisation over the rows of (N, C).

correction=0 is ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``;
correction=1 is the makemore notebook's Bessel-corrected variance, 1/(N-1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Cache(NamedTuple):
    xhat: torch.Tensor  # (N, C) normalised input: one (N, C) buffer, saves recomputing it in backward
    rstd: torch.Tensor  # (C,) 1 / sqrt(var + eps)
    weight: torch.Tensor | None  # (C,)
    has_bias: bool
    correction: int
    dtype: torch.dtype  # of x and out; xhat and rstd are kept in the accumulation dtype


@torch.no_grad()
def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    correction: int = 0,
) -> tuple[torch.Tensor, Cache]:
    """mean = x.mean(0);  var = ((x - mean)**2).sum(0) / (N - correction)
    out = weight * (x - mean) / sqrt(var + eps) + bias
    """
    _check.floating("x", x)
    _check.ndim("x", x, 2, "(N, C)")
    N, C = x.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check.floating(name, t)
            _check.shape(name, t, (C,), f"(C,) with C={C} channels of x")
            _check.same_dtype(name, t, "x", x)
    _check.same_device(x=x, weight=weight, bias=bias)
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
        raise ValueError(f"correction must be a non-negative int, got {correction!r}")
    if N <= correction:
        raise ValueError(
            f"x must have more rows than correction={correction} to estimate a variance, got N={N}"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")

    acc = _check.opmath(x.dtype)  # 16-bit inputs accumulate in float32, as torch's kernel does
    xa = x.to(acc)
    xc = xa - xa.mean(0)  # (N, C)
    # second pass: the mean of xc is the rounding error of the first mean (large at a large
    # offset, e.g. x ~ 50 +- 0.01); removing it centres x almost exactly (corrected two-pass)
    xc = xc - xc.mean(0)  # (N, C)
    var = (xc * xc).sum(0) / (N - correction)  # (C,)
    rstd = torch.rsqrt(var + eps)  # (C,)
    xhat = xc * rstd  # (N, C)
    out = xhat * weight.to(acc) if weight is not None else xhat.clone()  # never alias the cache
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype), Cache(xhat, rstd, weight, bias is not None, correction, x.dtype)


@torch.no_grad()
def backward(
    dout: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """With g = dout * weight and d = N - correction (sums over the N rows):
    dx      = rstd * (g - mean(g) - xhat * sum(g * xhat) / d)
    dweight = sum(dout * xhat),   dbias = sum(dout)
    """
    xhat, rstd, weight, has_bias, correction, dtype = cache
    N = xhat.shape[0]
    _check.dout(dout, xhat.shape, dtype)
    acc = xhat.dtype
    dy = dout.to(acc)  # (N, C)
    g = dy * weight.to(acc) if weight is not None else dy  # (N, C) d loss / d xhat
    # mean(g): the path through the mean; sum(g * xhat) / d: the path through the variance
    dx = rstd * (g - g.mean(0) - xhat * ((g * xhat).sum(0) / (N - correction)))  # (N, C)
    dweight = (dy * xhat).sum(0).to(dtype) if weight is not None else None  # (C,)
    dbias = dy.sum(0).to(dtype) if has_bias else None  # (C,)
    return dx.to(dout.dtype), dweight, dbias
