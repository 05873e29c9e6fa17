"""tanh: elementwise hyperbolic tangent, the twin of ``torch.tanh``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Args(NamedTuple):
    """forward's arguments, checked: what forward_math reads."""

    x: torch.Tensor  # (*)


class Cache(NamedTuple):
    out: torch.Tensor  # (*) tanh(x), the returned output itself: the rule needs only it, x is not kept
    versions: tuple[int, ...] = ()  # out's version counter at forward; () for a cache built by hand


VERSIONED = ("out",)  # the cache's tensors that the caller also holds: backward refuses them edited


@_check.no_autograd
def forward(x: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """out = tanh(x), elementwise."""
    return forward_math(prepare(x))


def prepare(x: torch.Tensor) -> Args:
    """Validate forward's arguments; returns forward_math's."""
    _check.floating("x", x)
    return Args(x)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    x = a.x
    out = torch.tanh(x)
    return out, Cache(out, _check.versions(out))


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor]:
    """dx = dout * (1 - out**2), since d tanh(x)/dx = 1 - tanh(x)**2."""
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "tanh")
    _check.unmodified(cache, VERSIONED)
    _check.dout(dout, cache.out.shape, cache.out.dtype, cache.out.device)


def backward_math(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor]:
    out = cache.out
    # (1 - y)(1 + y), not 1 - y*y: 1 - y is exact for y near 1 (Sterbenz), where 1 - y*y
    # rounds y*y first and loses bits to the cancellation
    dx = (1 - out).mul_(1 + out).mul_(dout)  # (*) = (1 - y) * (1 + y) * dout
    return (dx,)


def jvp(tangents: tuple[torch.Tensor | None], cache: Cache) -> torch.Tensor | None:
    """Forward mode: t_out = (1 - y)(1 + y) t_x, the backward's factor applied to the tangent.
    None when t_x is None."""
    (t_x,) = tangents
    if t_x is None:
        return None
    y = cache.out
    # as in backward_math: 1 - y is exact near |y| = 1. Out of place in t_x: under vmap the tangent
    # may be batched where y is not, and an in-place update of y's buffer by it is refused
    return (1 - y).mul_(1 + y) * t_x  # (*)
