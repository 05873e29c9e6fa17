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
    _check.floating("x", x)
    out = torch.tanh(x)
    return out, Cache(out)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor]:
    """dx = dout * (1 - out**2), since d tanh(x)/dx = 1 - tanh(x)**2."""
    out = cache.out
    _check.dout(dout, out.shape, out.dtype)
    # (1 - y)(1 + y), not 1 - y*y: 1 - y is exact for y near 1 (Sterbenz), where 1 - y*y
    # rounds y*y first and loses bits to the cancellation
    dx = (1 - out) * (1 + out) * dout  # (*)
    return (dx,)
