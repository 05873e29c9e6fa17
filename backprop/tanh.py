"""tanh: elementwise hyperbolic tangent, the twin of ``torch.tanh``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Cache(NamedTuple):
    out: torch.Tensor  # (*) tanh(x): the rule needs only the output, so x is not kept


@_check.no_autograd
def forward(x: torch.Tensor) -> tuple[torch.Tensor, Cache]:
    """out = tanh(x), elementwise."""
    return forward_math(*check_forward(x))


def check_forward(x):
    """Validate forward's arguments; returns forward_math's."""
    _check.floating("x", x)
    return (x,)


def forward_math(x):
    out = torch.tanh(x)
    return out, Cache(out)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor]:
    """dx = dout * (1 - out**2), since d tanh(x)/dx = 1 - tanh(x)**2."""
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout, cache: Cache) -> None:
    _check.dout(dout, cache.out.shape, cache.out.dtype)


def backward_math(dout, cache: Cache):
    out = cache.out
    # (1 - y)(1 + y), not 1 - y*y: 1 - y is exact for y near 1 (Sterbenz), where 1 - y*y
    # rounds y*y first and loses bits to the cancellation
    dx = (1 - out).mul_(1 + out).mul_(dout)  # (*) = (1 - y) * (1 + y) * dout
    return (dx,)
