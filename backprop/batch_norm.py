"""batch_norm: batch normalisation over every dim of x (N, C, *) but the channels, the twin of
``F.batch_norm``.

Shapes: x is (N, C) or (N, C, L...) with L... any trailing dims; "per channel" means over the
n = N * prod(L...) values of one channel. correction=0 is ``F.batch_norm(x, None, None, weight,
bias, training=True, eps=eps)``; correction=1 is the makemore notebook's Bessel-corrected
variance, 1/(n-1). training=False normalises with the caller's running statistics.

Running statistics are never updated in place (torch's kernel does that): in training mode with
``running_mean`` and ``running_var``, forward returns the updated ones on the cache
(``cache.updated_mean``, ``cache.updated_var``, ``cache.updated_batches``), also as
``updated_stats(cache)``; a model carries them to the next step.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch

from backprop import _check


class Args(NamedTuple):
    """forward's arguments, checked: what forward_math reads."""

    x: torch.Tensor  # (N, C, *)
    weight: torch.Tensor | None  # (C,)
    bias: torch.Tensor | None  # (C,)
    eps: float
    correction: int
    running_mean: torch.Tensor | None = None  # (C,)
    running_var: torch.Tensor | None = None  # (C,)
    training: bool = True
    momentum: float | None = 0.1  # None: the cumulative average, 1 / (num_batches_tracked + 1)
    num_batches_tracked: int = 0  # batches seen before this one


class Cache(NamedTuple):
    # no x-hat: backward recomputes it from x (``normalised``; torch's kernel saves x, mean, 1/std too):
    # the forward writes out alone, and the cache holds nothing of x's size but the caller's x
    x: torch.Tensor  # (N, C, *) the caller's input, kept without a copy
    mean: torch.Tensor  # (C,) the mean x is centred on: the batch's (training) or running_mean (eval)
    mean_rest: torch.Tensor | None  # (C,) what mean's rounding left out (training), subtracted second; None: 0
    rstd: torch.Tensor  # (C,) 1 / sqrt(var + eps), var the batch's (training) or running_var (eval)
    weight: torch.Tensor | None  # (C,)
    has_bias: bool
    correction: int
    dtype: torch.dtype  # of x and out; mean, mean_rest and rstd (ours, new tensors) in the accumulation dtype
    versions: tuple[int | None, ...] = ()  # of x and weight (None if absent) at forward; () when built by hand
    training: bool = True  # False: the statistics are constants, backward is the affine one
    # training with running statistics: the updated ones (ours, new tensors), else None
    updated_mean: torch.Tensor | None = None  # (C,) m mean + (1 - m) running_mean
    updated_var: torch.Tensor | None = None  # (C,) m var * n / (n - 1) + (1 - m) running_var
    updated_batches: int | None = None  # num_batches_tracked + 1


class RunningStats(NamedTuple):
    running_mean: torch.Tensor  # (C,)
    running_var: torch.Tensor  # (C,)
    num_batches_tracked: int


VERSIONED = ("x", "weight")  # the caller's tensors, kept without a copy: backward refuses them edited


def updated_stats(cache: Cache) -> RunningStats | None:
    """The running statistics after forward's batch: what torch's kernel writes into running_mean
    and running_var in place (and nn.BatchNorm into num_batches_tracked). None without them."""
    if cache.updated_mean is None:
        return None
    return RunningStats(cache.updated_mean, cache.updated_var, cache.updated_batches)


@_check.no_autograd
def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    correction: int = 0,
    num_batches_tracked: int = 0,
) -> tuple[torch.Tensor, Cache]:
    """Per channel, over the n values of dims 0, 2, 3, ...:
    training: mean = x.mean();  var = ((x - mean)**2).sum() / (n - correction)
    eval:     mean, var = running_mean, running_var
    out = weight * (x - mean) / sqrt(var + eps) + bias

    Training with running statistics also returns, on the cache, with m = momentum (or
    1 / (num_batches_tracked + 1) for momentum=None, nn.BatchNorm's cumulative average):
    updated_mean = m mean + (1 - m) running_mean,  updated_var = m var_unbiased + (1 - m) running_var
    (the unbiased variance, 1/(n-1), whatever correction is, as torch keeps it), torch's formula
    with m rounded as its kernel rounds it: an infinite running statistic stays infinite (its sign
    that of 1 - m), and is nan where m rounds to 1 (0 * inf). No value per channel (N = 0) leaves
    them as they were and gives an empty output, as torch does.

    An infinite weight gives +-inf (nan where x equals the mean), as the formula does; F.batch_norm
    on the CPU gives nan there, because it folds the affine into x * s + (bias - mean * s).
    Zero channels give an empty result, with or without weight and bias (F.batch_norm with an
    empty weight or bias fails with an IndexError from select()). These and the other differences
    from F.batch_norm are listed in docs/divergences.md.
    """
    return forward_math(prepare(x, weight, bias, running_mean=running_mean, running_var=running_var,
                                training=training, momentum=momentum, eps=eps, correction=correction,
                                num_batches_tracked=num_batches_tracked))


def _count(x: torch.Tensor) -> int:
    """n, the values per channel: N * prod(L...)."""
    return math.prod(x.shape[:1] + x.shape[2:])


def prepare(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    correction: int = 0,
    num_batches_tracked: int = 0,
) -> Args:
    """Validate forward's arguments; returns forward_math's."""
    _check.floating("x", x)
    if x.ndim < 2 and not (x.ndim == 1 and x.numel() == 0):
        raise ValueError(f"x must be at least 2-D (N, C, *), got {x.ndim}-D with shape {tuple(x.shape)}")
    C = _as_nc(x).shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check.floating(name, t)
            _check.shape(name, t, (C,), f"(C,) with C={C} channels of x")
            _check.same_dtype(name, t, "x", x)
    training = _check.bool_option("training", training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None, got "
                         f"running_mean {'None' if running_mean is None else 'a tensor'} and "
                         f"running_var {'None' if running_var is None else 'a tensor'}")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given when training=False: "
                         "evaluation normalises with them")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check.floating(name, t)
            _check.shape(name, t, (C,), f"(C,) with C={C} channels of x")
            # as weight and bias (torch's CPU kernel takes float32 statistics for 16-bit x only
            # when weight and bias are float32 too, which we refuse)
            _check.same_dtype(name, t, "x", x)
    _check.same_device(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    # a ValueError for a bool or a float too, not the TypeError of the other options: callers match it
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
        raise ValueError(f"correction must be a non-negative int, got {correction!r}")
    n = _count(x)
    if training and 0 < n <= correction:
        if x.ndim == 2:
            raise ValueError(
                f"x must have more rows than correction={correction} to estimate a variance, got N={n}")
        raise ValueError(f"x must have more values per channel (N * L) than correction={correction} "
                         f"to estimate a variance, got {n}")
    if training and running_mean is not None and n == 1:
        raise ValueError("running_var is updated with the unbiased variance, 1/(n - 1): it needs more "
                         "than one value per channel, got x of shape " + str(tuple(x.shape)))
    if momentum is not None:
        momentum = _check.float_option("momentum", momentum)
    num_batches_tracked = _check.int_option("num_batches_tracked", num_batches_tracked)
    if num_batches_tracked < 0:
        raise ValueError(f"num_batches_tracked must be a non-negative int, got {num_batches_tracked}")
    eps = _check.float_option("eps", eps)
    if not eps > 0:  # eps = 0 divides by zero on a constant channel (torch accepts it and gives nan)
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return Args(x, weight, bias, eps, correction, running_mean, running_var, training, momentum,
                num_batches_tracked)


def _as_nc(t: torch.Tensor) -> torch.Tensor:
    """An empty 1-D x (which F.batch_norm accepts, and OpInfo samples) read as (0, 0): no rows,
    no channels. Every other x is (N, C, *) already."""
    return t.reshape(0, 0) if t.ndim == 1 else t


def _dims(ndim: int) -> tuple[int, ...]:
    """The reduced dims: all but the channels (dim 1)."""
    return (0, *range(2, ndim))


def _channel_sum(t: torch.Tensor, dims: tuple[int, ...], mean: bool = False) -> torch.Tensor:
    """t summed over dims, (N, C, *) -> (C,). A large 2-D (N, C), N a multiple of 8, is summed in
    blocks of 8 rows, (N / 8, 8, C) -> (N / 8, C) -> (C,): the same sum, but Inductor's loop walks a
    block 8 channels at a time, row to row C floats apart, and 8 rows stay in L1 where all N rows
    fall out of cache (compiled: 2.8x faster at 4096 x 1024 than over all N, 1.8x than 64 rows).
    mean=True: the mean instead (of equal blocks, the mean of the blocks' means)."""
    reduce = torch.mean if mean else torch.sum
    if t.ndim == 2 and t.numel() >= 2**20 and t.shape[0] % 8 == 0:
        return reduce(reduce(t.reshape(-1, 8, t.shape[1]), 1), 0)
    return reduce(t, dims)


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) as (1, C, 1, ...): broadcast against x (N, C, *)."""
    return v if ndim == 2 else v.reshape(1, -1, *[1] * (ndim - 2))


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    """forward without the checks."""
    x, weight, bias, eps, correction = _as_nc(a.x), a.weight, a.bias, a.eps, a.correction
    n, dims, nd = _count(x), _dims(x.ndim), x.ndim
    acc = _check.opmath(x.dtype)  # 16-bit inputs accumulate in float32, as torch's kernel does
    xa = _check.cast(x, acc)
    updated = (None, None, None)
    if a.training:
        mean = _channel_sum(xa, dims, mean=True)  # (C,)
        xc = xa - _per_channel(mean, nd)  # (N, C, *)
        # second pass: the mean of xc is the rounding error of the first mean (large at a large
        # offset, e.g. x ~ 50 +- 0.01); removing it centres x almost exactly (corrected two-pass).
        # sum((xc - mean_rest)**2) = sum(xc**2) - n mean_rest**2: both sums in that one pass over xc
        mean_rest = _channel_sum(xc, dims, mean=True)  # (C,)
        var_sum = _channel_sum(xc * xc, dims).addcmul_(mean_rest, mean_rest, value=-n)  # (C,)
        xc -= _per_channel(mean_rest, nd)
        rstd = (var_sum / (n - correction)).add_(eps).rsqrt_()  # (C,) 1/sqrt(var + eps)
        if a.running_mean is not None:
            updated = _updated_stats(a, mean + mean_rest, var_sum, n)
    else:
        rstd = (_check.cast(a.running_var, acc) + eps).rsqrt_()  # (C,) a new tensor: ours
        mean, mean_rest = _check.cast(a.running_mean, acc).clone(), None  # ours: the caller may update theirs
        xc = xa - _per_channel(mean, nd)  # (N, C, *)
    xhat = xc.mul_(_per_channel(rstd, nd))  # (N, C, *), in place: xc is ours
    w = _per_channel(_check.cast(weight, acc), nd) if weight is not None else None
    b = _per_channel(_check.cast(bias, acc), nd) if bias is not None else None
    if w is not None and b is not None:
        out = torch.addcmul(b, xhat, w)  # bias + xhat * weight
    elif w is not None:
        out = xhat.mul_(w)
    elif b is not None:
        out = xhat.add_(b)
    else:
        out = xhat
    if x is not a.x:  # an empty 1-D x, read as (0, 0): back to its own shape
        out = out.reshape(a.x.shape)
    return _check.cast(out, x.dtype), Cache(a.x, mean, mean_rest, rstd, weight, bias is not None, correction,
                                            x.dtype, _check.versions(a.x, weight), a.training, *updated)


def normalised(cache: Cache) -> torch.Tensor:
    """The normalised input, (N, C, *) in the accumulation dtype, recomputed from the cache with the
    forward's own operations (so the forward's bits): ((x - mean) - mean_rest) * rstd."""
    x = _as_nc(cache.x)
    xc = _check.cast(x, cache.rstd.dtype) - _per_channel(cache.mean, nd := x.ndim)
    if cache.mean_rest is not None:
        xc -= _per_channel(cache.mean_rest, nd)
    return xc.mul_(_per_channel(cache.rstd, nd))


def _updated_stats(a: Args, mean: torch.Tensor, var_sum: torch.Tensor, n: int) -> tuple:
    """(updated_mean, updated_var, updated_batches): new tensors in the statistics' dtype."""
    rm, rv = a.running_mean, a.running_var
    batches = a.num_batches_tracked + 1
    if n == 0:  # no value per channel: torch leaves the statistics as they were
        return rm.clone(), rv.clone(), batches
    acc = mean.dtype
    m, keep = _momentum(a.momentum if a.momentum is not None else 1.0 / batches, rm.dtype)
    # torch's m stat + (1 - m) r, not torch.lerp's r + m (stat - r): an infinite r stays infinite
    # (lerp's inf - inf is nan) and is nan where torch's is (m = 1: 0 * inf)
    new_mean = torch.add(mean * m, _check.cast(rm, acc) * keep)
    new_var = torch.add((var_sum / (n - 1)) * m, _check.cast(rv, acc) * keep)  # unbiased, as torch keeps it
    return new_mean.to(rm.dtype), new_var.to(rv.dtype), batches


def _momentum(m: float, dtype: torch.dtype) -> tuple[float, float]:
    """(m, 1 - m) with m rounded as torch's CPU kernel rounds it (measured, torch 2.13): to float32 for
    float32 and float16 statistics, to bfloat16 (through float32) for bfloat16 ones. Where m rounds to
    1 (m = 1 - 1e-9 in float32, 0.999 in bfloat16), 1 - m is 0 and an infinite statistic becomes nan
    (0 * inf), as torch's does.
    For float32, 1 - m here (in float64, then cast by the ops) is torch's float32 1 - m: exact in
    float64 for 2^-29 <= |m| <= 2^53 (m has 24 bits), and 1 or -m in both outside that."""
    if dtype == torch.float64:
        return m, 1 - m
    try:
        m = struct.unpack("f", struct.pack("f", m))[0]
    except OverflowError:  # past float32's largest (some Pythons raise, others give inf)
        m = math.copysign(math.inf, m)
    if dtype == torch.bfloat16:  # float32's top 16 bits, rounded to nearest even
        bits = struct.unpack("<I", struct.pack("<f", m))[0]
        m = struct.unpack("<f", struct.pack("<I", (bits + 0x7FFF + (bits >> 16 & 1)) >> 16 << 16))[0]
    return m, 1 - m


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """With d = n - correction and sums per channel over its n values:
    dbias = sum(dout),   dweight = sum(dout * xhat)
    training: dx = weight * rstd * (dout - dbias / n - xhat * dweight / d)
              (the mean's path gives dbias / n, the variance's path xhat * dweight / d)
    eval:     dx = weight * rstd * dout (the running statistics are constants)
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "batch_norm")
    _check.unmodified(cache, VERSIONED)
    _check.dout(dout, cache.x.shape, cache.dtype, cache.x.device)


def backward_math(
    dout: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    xhat, rstd, weight = normalised(cache), cache.rstd, cache.weight
    correction, dtype = cache.correction, cache.dtype
    n, dims, nd, acc = _count(xhat), _dims(xhat.ndim), xhat.ndim, xhat.dtype
    dy = _check.cast(_as_nc(dout), acc)  # (N, C, *)
    dbias = _channel_sum(dy, dims)  # (C,)
    dweight = _channel_sum(dy * xhat, dims)  # (C,)
    scale = _per_channel(rstd * _check.cast(weight, acc) if weight is not None else rstd, nd)  # (1, C, 1..)
    if cache.training:
        # dy - dbias / n - xhat * dweight / d, the last two in one addcmul
        dx = torch.sub(dy, torch.addcmul(_per_channel(dbias / n, nd), xhat,
                                         _per_channel(dweight / (n - correction), nd)))  # (N, C, *)
        dx *= scale
    else:
        dx = dy * scale  # (N, C, *)
    return (
        _check.cast(dx, dtype).reshape(dout.shape) if dout.ndim == 1 else _check.cast(dx, dtype),
        _check.cast(dweight, dtype) if weight is not None else None,
        _check.cast(dbias, dtype) if cache.has_bias else None,
    )


def jvp(
    tangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], cache: Cache
) -> torch.Tensor | None:
    """Forward mode, with d = n - correction, means and sums per channel over its n values:
    training: t_xhat = rstd * (t_xc - xhat * sum(xhat * t_xc) / d),  t_xc = t_x - mean(t_x)
              (from d xc = t_xc and d rstd = -rstd^3 sum(xc t_xc) / d, with xc = xhat / rstd)
    eval:     t_xhat = rstd * t_x
    t_out  = weight * t_xhat + t_weight * xhat + t_bias
    None when every tangent is None.
    """
    t_x, t_w, t_b = (tuple(tangents) + (None, None))[:3]
    # by name: a field added to Cache leaves this rule as it is
    shape = cache.x.shape
    xhat, rstd, weight = normalised(cache), cache.rstd, cache.weight
    correction, dtype = cache.correction, cache.dtype
    n, dims, nd, acc = _count(xhat), _dims(xhat.ndim), xhat.ndim, xhat.dtype
    t_x = None if t_x is None else _as_nc(t_x)
    t_out = None
    if t_x is not None:
        scale = _per_channel(rstd * _check.cast(weight, acc) if weight is not None else rstd, nd)
        t_xc = _check.cast(t_x, acc)  # (N, C, *)
        if cache.training:
            t_xc = t_xc - _per_channel(t_xc.mean(dims), nd)
            # sum(xhat * t_x) alone is the same in exact arithmetic (sum(xhat) = 0); centring t_x
            # first keeps the rounding of xhat's mean out of it
            proj = (xhat * t_xc).sum(dims).div_(n - correction)  # (C,)
            t_out = (t_xc - xhat * _per_channel(proj, nd)) * scale  # (N, C, *)
        else:
            t_out = t_xc * scale  # (N, C, *)
    # the terms are added out of place: under vmap one tangent may be batched and another not
    if t_w is not None:
        term = xhat * _per_channel(_check.cast(t_w, acc), nd)  # (N, C, *)
        t_out = term if t_out is None else t_out + term
    if t_b is not None:
        term = _per_channel(_check.cast(t_b, acc), nd).expand(xhat.shape)  # (N, C, *)
        t_out = term.clone() if t_out is None else t_out + term
    return None if t_out is None else _check.cast(t_out, dtype).reshape(shape)
