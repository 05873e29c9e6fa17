"""batch_norm: training-mode batch normalisation over the rows of (N, C).

correction=0 is ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``;
correction=1 is the makemore notebook's Bessel-corrected variance, 1/(N-1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Args(NamedTuple):
    """forward's arguments, checked: what forward_math reads."""

    x: torch.Tensor  # (N, C)
    weight: torch.Tensor | None  # (C,)
    bias: torch.Tensor | None  # (C,)
    eps: float
    correction: int


class Cache(NamedTuple):
    xhat: torch.Tensor  # (N, C) normalised input: one (N, C) buffer, saves recomputing it in backward
    rstd: torch.Tensor  # (C,) 1 / sqrt(var + eps)
    weight: torch.Tensor | None  # (C,)
    has_bias: bool
    correction: int
    dtype: torch.dtype  # of x and out; xhat and rstd (ours, never the caller's) in the accumulation dtype
    versions: tuple[int | None, ...] = ()  # of weight (None if absent) at forward; () for a cache built by hand


VERSIONED = ("weight",)  # the caller's tensor, kept without a copy: backward refuses it edited


@_check.no_autograd
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

    An infinite weight gives +-inf (nan where x equals the mean), as the formula does; F.batch_norm
    on the CPU gives nan there, because it folds the affine into x * s + (bias - mean * s).
    Zero channels give an empty result, with or without weight and bias (F.batch_norm with an
    empty weight or bias fails with an IndexError from select()). These and the other differences
    from F.batch_norm are listed in docs/divergences.md.
    """
    return forward_math(prepare(x, weight, bias, eps=eps, correction=correction))


def prepare(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    correction: int = 0,
) -> Args:
    """Validate forward's arguments; returns forward_math's."""
    _check.floating("x", x)
    _check.ndim("x", x, 2, "(N, C)")
    N, C = x.shape
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check.floating(name, t)
            _check.shape(name, t, (C,), f"(C,) with C={C} channels of x")
            _check.same_dtype(name, t, "x", x)
    _check.same_device(x=x, weight=weight, bias=bias)
    # a ValueError for a bool or a float too, not the TypeError of the other options: callers match it
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
        raise ValueError(f"correction must be a non-negative int, got {correction!r}")
    if N <= correction:
        raise ValueError(
            f"x must have more rows than correction={correction} to estimate a variance, got N={N}"
        )
    eps = _check.float_option("eps", eps)
    if not eps > 0:  # eps = 0 divides by zero on a constant channel (torch accepts it and gives nan)
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return Args(x, weight, bias, eps, correction)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    """forward without the checks."""
    x, weight, bias, eps, correction = a
    N = x.shape[0]
    acc = _check.opmath(x.dtype)  # 16-bit inputs accumulate in float32, as torch's kernel does
    xa = _check.cast(x, acc)
    xc = xa - xa.mean(0)  # (N, C)
    # second pass: the mean of xc is the rounding error of the first mean (large at a large
    # offset, e.g. x ~ 50 +- 0.01); removing it centres x almost exactly (corrected two-pass)
    xc -= xc.mean(0)
    rstd = (xc * xc).sum(0).div_(N - correction).add_(eps).rsqrt_()  # (C,) 1/sqrt(var + eps)
    xhat = xc.mul_(rstd)  # (N, C), in place: xc is ours
    if weight is not None and bias is not None:
        out = torch.addcmul(_check.cast(bias, acc), xhat, _check.cast(weight, acc))  # bias + xhat * weight
    elif weight is not None:
        out = xhat * _check.cast(weight, acc)
    elif bias is not None:
        out = xhat + _check.cast(bias, acc)
    else:
        out = xhat.clone()  # never alias the cache
    return _check.cast(out, x.dtype), Cache(
        xhat, rstd, weight, bias is not None, correction, x.dtype, _check.versions(weight))


@_check.no_autograd
def backward(
    dout: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """With d = N - correction and sums over the N rows:
    dbias = sum(dout),   dweight = sum(dout * xhat)
    dx    = weight * rstd * (dout - dbias / N - xhat * dweight / d)
    (the mean's path gives dbias / N, the variance's path xhat * dweight / d)
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "batch_norm")
    _check.unmodified(cache, VERSIONED)
    _check.dout(dout, cache.xhat.shape, cache.dtype, cache.xhat.device)


def backward_math(
    dout: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    xhat, rstd, weight, has_bias, correction, dtype, _ = cache
    N = xhat.shape[0]
    acc = xhat.dtype
    dy = _check.cast(dout, acc)  # (N, C)
    dbias = dy.sum(0)  # (C,)
    dweight = (dy * xhat).sum(0)  # (C,)
    scale = rstd * _check.cast(weight, acc) if weight is not None else rstd  # (C,)
    # dy - dbias / N - xhat * dweight / d, the last two in one addcmul
    dx = torch.sub(dy, torch.addcmul(dbias / N, xhat, dweight / (N - correction)))  # (N, C)
    dx *= scale
    return (
        _check.cast(dx, dtype),
        _check.cast(dweight, dtype) if weight is not None else None,
        _check.cast(dbias, dtype) if has_bias else None,
    )


def jvp(
    tangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], cache: Cache
) -> torch.Tensor | None:
    """Forward mode, with d = N - correction, means and sums over the N rows:
    t_xhat = rstd * (t_xc - xhat * sum(xhat * t_xc) / d),  t_xc = t_x - mean(t_x)
    t_out  = weight * t_xhat + t_weight * xhat + t_bias
    (from d xc = t_xc and d rstd = -rstd^3 sum(xc t_xc) / d, with xc = xhat / rstd).
    None when every tangent is None.
    """
    t_x, t_w, t_b = (tuple(tangents) + (None, None))[:3]
    # by name: a field added to Cache leaves this rule as it is
    xhat, rstd, weight, correction, dtype = cache.xhat, cache.rstd, cache.weight, cache.correction, cache.dtype
    N = xhat.shape[0]
    acc = xhat.dtype
    t_out = None
    if t_x is not None:
        t_xc = _check.cast(t_x, acc)  # (N, C)
        t_xc = t_xc - t_xc.mean(0)
        # sum(xhat * t_x) alone is the same in exact arithmetic (sum(xhat) = 0); centring t_x
        # first keeps the rounding of xhat's mean out of it
        proj = (xhat * t_xc).sum(0).div_(N - correction)  # (C,)
        scale = rstd * _check.cast(weight, acc) if weight is not None else rstd  # (C,)
        t_out = (t_xc - xhat * proj) * scale  # (N, C)
    # the terms are added out of place: under vmap one tangent may be batched and another not
    if t_w is not None:
        term = xhat * _check.cast(t_w, acc)  # (N, C)
        t_out = term if t_out is None else t_out + term
    if t_b is not None:
        term = _check.cast(t_b, acc).expand(xhat.shape)  # (N, C)
        t_out = term.clone() if t_out is None else t_out + term
    return None if t_out is None else _check.cast(t_out, dtype)
