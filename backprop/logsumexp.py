"""logsumexp: log(sum(exp(x))) along dims, the twin of ``torch.logsumexp``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Args(NamedTuple):
    """forward's arguments, checked: what forward_math reads."""

    x: torch.Tensor  # (*)
    dims: tuple[int, ...]  # reduced dims, non-negative; () for a 0-d x
    keepdim: bool


class Cache(NamedTuple):
    x: torch.Tensor  # (*) the input (the caller holds it anyway: no new buffer)
    shift: torch.Tensor  # x's shape with the reduced dims of size 1: the row max; finfo.max where it
    # is +inf, 0 where it is -inf or nan
    sumexp: torch.Tensor  # same shape: sum(exp(x - shift))
    dims: tuple[int, ...]  # reduced dims, non-negative
    keepdim: bool
    versions: tuple[int, ...] = ()  # of x at forward; () for a cache built by hand


VERSIONED = ("x",)  # the caller's tensor, kept without a copy: backward refuses it edited


def _dims(dim: int | tuple[int, ...] | list[int], ndim: int) -> tuple[int, ...]:
    raw = (dim,) if isinstance(dim, int) and not isinstance(dim, bool) else dim
    if not isinstance(raw, (tuple, list)) or len(raw) == 0:
        raise TypeError(f"dim must be an int or a non-empty tuple of ints, got {dim!r}")
    dims = tuple(_check.wrap_dim("dim", d, ndim) for d in raw)
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim must not repeat a dimension, got {dim!r}")
    return dims


@_check.no_autograd
def forward(
    x: torch.Tensor, *, dim: int | tuple[int, ...] = -1, keepdim: bool = False
) -> tuple[torch.Tensor, Cache]:
    """out = m + log(sum(exp(x - m))) along dim, with m the max along dim (shifted coordinates).
    An empty dim gives -inf (the log of an empty sum), with m = 0, as torch does."""
    return forward_math(prepare(x, dim=dim, keepdim=keepdim))


def prepare(x: torch.Tensor, *, dim: int | tuple[int, ...] = -1, keepdim: bool = False) -> Args:
    """Validate forward's arguments; returns forward_math's (dim as a tuple of non-negative dims)."""
    _check.floating("x", x)
    dims = _dims(dim, x.ndim)
    if x.ndim == 0:
        dims = ()  # reducing a 0-d tensor is the identity, as in torch
    return Args(x, dims, _check.bool_option("keepdim", keepdim))


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    x, dims, keepdim = a
    if dims and any(x.shape[d] == 0 for d in dims):
        # an empty sum: out = log(0) = -inf, as torch gives (amax refuses an empty dim)
        shift = x.new_zeros([1 if d in dims else s for d, s in enumerate(x.shape)])
    else:
        shift = x.amax(dim=dims, keepdim=True) if dims else x.clone()
    # a row whose max is not finite would give inf - inf = nan: a -inf or nan max is shifted by 0; a
    # +inf max by the dtype's largest finite value (nan_to_num's default posinf), so that exp(x - m)
    # is inf at a +inf entry and at most 1 at a finite one (0 above log(max) too, where exp(x) would
    # overflow): sumexp and out are +inf and dx is 0 at every finite entry, nan at the +inf, as torch's
    # dout * exp(x - out) with out = +inf
    shift = shift.nan_to_num_(0.0, None, 0.0)  # in place: shift is ours (amax or clone)
    sumexp = (x - shift).exp_().sum(dim=dims, keepdim=True) if dims else (x - shift).exp_()
    out = sumexp.log().add_(shift)  # keepdim shape
    if not keepdim and dims:
        out = out.squeeze(dims)
    return out, Cache(x, shift, sumexp, dims, keepdim, _check.versions(x))


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor]:
    """dx = dout * softmax(x) = dout * exp(x - m) / sum(exp(x - m)), broadcast over the dims.
    Computed from the shift m, never from exp(x - out): out is rounded, m is exact.
    An empty dim gives an empty dx.
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "logsumexp")
    _check.unmodified(cache, VERSIONED)
    x, shift, _, dims, keepdim, _ = cache
    # the output's shape, computed on the host (shift.squeeze(dims).shape would be one more dispatch)
    out_shape = shift.shape if keepdim or not dims else [s for d, s in enumerate(shift.shape) if d not in dims]
    _check.dout(dout, out_shape, x.dtype, x.device)


def backward_math(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor]:
    x, shift, sumexp, dims, keepdim, _ = cache
    if dims and not keepdim:
        dout = dout.reshape(shift.shape)  # put the reduced dims back as size 1 to broadcast
    dx = (x - shift).exp_().mul_(dout / sumexp)  # (*) exp(x - m) * dout / sumexp
    return (dx,)


def jvp(tangents: tuple[torch.Tensor | None], cache: Cache) -> torch.Tensor | None:
    """Forward mode: t_out = <softmax(x), t_x> along the dims = sum(exp(x - m) t_x) / sumexp.
    None when t_x is None."""
    (t_x,) = tangents
    if t_x is None:
        return None
    x, shift, sumexp, dims, keepdim = cache.x, cache.shift, cache.sumexp, cache.dims, cache.keepdim
    if not dims:  # a 0-d x: out = x, t_out = t_x, but nan at x = +-inf, as backward (and torch) give
        return t_x * (x - shift).exp() / sumexp
    # exp(x - m) * t_x out of place: under vmap t_x may be batched where x is not
    t_out = ((x - shift).exp_() * t_x).sum(dim=dims, keepdim=True) / sumexp  # keepdim shape
    return t_out if keepdim else t_out.squeeze(dims)
