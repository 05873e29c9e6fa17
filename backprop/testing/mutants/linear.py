"""Known bugs in linear's kernel (see backprop.testing.mutants)."""

from __future__ import annotations

from backprop import linear
from backprop.testing.catalogue import mutant


@mutant(linear)
def linear_missing_transpose_backward(dout, cache):
    """dx = dout @ W.T: a missing transpose that only square weights let through."""
    x, weight, has_bias, _ = cache
    H, D = weight.shape
    dout2 = dout.reshape(-1, H)
    dx = (dout2 @ weight.T).reshape(x.shape)  # shapes only agree when H == D
    return dx, dout2.t() @ x.reshape(-1, D), dout2.sum(0) if has_bias else None


def _square(case):
    """Cut a linear case down to a square weight, where the missing transpose still runs."""
    (x, weight, bias), options = case
    k = min(weight.shape)
    return (x[..., :k].contiguous(), weight[:k, :k].contiguous(), None if bias is None else bias[:k]), options


linear_missing_transpose_backward.cases = lambda strategy: strategy.map(_square)


@mutant(linear)
def linear_bias_first_row_backward(dout, cache):
    """Bias gradient taken from the first row only."""
    dx, dweight, dbias = linear.backward(dout, cache)
    return dx, dweight, dout.reshape(-1, cache.weight.shape[0])[0].clone() if cache.has_bias else None


MUTANTS = [
    linear_missing_transpose_backward,
    linear_bias_first_row_backward,
]
