"""linear: out = x @ weight.T + bias, the twin of ``F.linear``."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from backprop import _check


class Args(NamedTuple):
    """forward's arguments, checked: what forward_math reads."""

    x: torch.Tensor  # (*, D)
    weight: torch.Tensor  # (H, D)
    bias: torch.Tensor | None  # (H,)


class Cache(NamedTuple):
    x: torch.Tensor  # (*, D) the input, needed for dweight
    weight: torch.Tensor  # (H, D) needed for dx
    has_bias: bool
    versions: tuple[int, ...] = ()  # of x and weight at forward; () for a cache built by hand


VERSIONED = ("x", "weight")  # the caller's tensors, kept without a copy: backward refuses them edited


@_check.no_autograd
def forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, Cache]:
    """out[..., h] = sum_d x[..., d] * weight[h, d] + bias[h]."""
    return forward_math(prepare(x, weight, bias))


def prepare(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Args:
    """Validate forward's arguments; returns forward_math's."""
    _check.floating("x", x)
    _check.floating("weight", weight)
    _check.ndim("weight", weight, 2, "(H, D)")
    if x.ndim < 1:
        raise ValueError(f"x must be at least 1-D (*, D), got 0-D with shape {tuple(x.shape)}")
    H, D = weight.shape
    if x.shape[-1] != D:
        raise ValueError(
            f"x must have D={D} features in its last dimension to match weight (H, D)=({H}, {D}), "
            f"got shape {tuple(x.shape)}"
        )
    _check.same_dtype("weight", weight, "x", x)
    if bias is not None:
        _check.floating("bias", bias)
        _check.shape("bias", bias, (H,), "(H,) to match weight")
        _check.same_dtype("bias", bias, "x", x)
    _check.same_device(x=x, weight=weight, bias=bias)

    return Args(x, weight, bias)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    x, weight, bias = a
    H, D = weight.shape
    # (N, D): leading dimensions flattened into rows, the row count explicit (D may be 0)
    x2 = x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), D)
    out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, H)
    out = out if x.ndim == 2 else out.reshape(*x.shape[:-1], H)  # (*, H)
    return out, Cache(x, weight, bias is not None, _check.versions(x, weight))


@_check.no_autograd
def backward(
    dout: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """out = x @ W.T + b  gives
    dx = dout @ W,   dW = dout.T @ x (summed over leading dims),   db = dout.sum(leading dims).
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "linear")
    _check.unmodified(cache, VERSIONED)
    _check.dout(dout, (*cache.x.shape[:-1], cache.weight.shape[0]), cache.x.dtype, cache.x.device)


def backward_math(
    dout: torch.Tensor, cache: Cache
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x, weight, has_bias, _ = cache
    H, D = weight.shape
    if x.ndim == 2:
        x2, dout2 = x, dout  # (N, D), (N, H)
    else:  # leading dimensions flattened into N rows, the count explicit (D may be 0)
        N = math.prod(x.shape[:-1])
        x2, dout2 = x.reshape(N, D), dout.reshape(N, H)
    dx = dout2 @ weight  # (N, D)
    dweight = dout2.t() @ x2  # (H, D)
    dbias = dout2.sum(0) if has_bias else None  # (H,)
    return (dx if x.ndim == 2 else dx.reshape(x.shape)), dweight, dbias


def jvp(
    tangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], cache: Cache
) -> torch.Tensor | None:
    """Forward mode (bilinear): t_out = t_x W^T + x t_W^T + t_b. None when every tangent is None."""
    t_x, t_w, t_b = (tuple(tangents) + (None, None))[:3]
    x, weight = cache.x, cache.weight
    t_out = None
    if t_x is not None:
        t_out = torch.matmul(t_x, weight.t())  # (*, H) t_x W^T
    if t_w is not None:
        term = torch.matmul(x, t_w.t())  # (*, H) x t_W^T
        # out of place: under vmap one tangent may be batched and another not
        t_out = term if t_out is None else t_out + term
    if t_b is not None:  # broadcast over the leading dims
        t_out = t_b.expand(*x.shape[:-1], weight.shape[0]).clone() if t_out is None else t_out + t_b
    return t_out
