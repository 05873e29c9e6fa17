"""Known bugs in batch_norm's kernel (see backprop.testing.mutants)."""

from __future__ import annotations

import torch

from backprop import batch_norm
from backprop.testing.catalogue import mutant


@torch.no_grad()  # a mutant is caught by its maths, not by recording history
def _bn_backward(dout, cache, *, d=None, mean_term=True, var_term=True, swap=False, dims=None):
    xhat, rstd, weight = batch_norm.normalised(cache), cache.rstd, cache.weight
    correction, dtype = cache.correction, cache.dtype
    dims = (0, *range(2, xhat.ndim)) if dims is None else dims
    bc = lambda v: v.reshape(1, -1, *[1] * (xhat.ndim - 2))  # noqa: E731 (C,) against (N, C, *)
    n = xhat.numel() // max(xhat.shape[1], 1)
    d = n - correction if d is None else d
    dy = dout.to(xhat.dtype)
    dbias, dweight = dy.sum(dims), (dy * xhat).sum(dims)
    scale = bc(rstd * weight.to(xhat.dtype) if weight is not None else rstd)
    if not cache.training:
        dx = scale * dy
    else:
        dx = scale * (dy - (bc(dbias / n) if mean_term else 0) - (xhat * bc(dweight / d) if var_term else 0))
    dw, db = (dbias, dweight) if swap else (dweight, dbias)
    return dx.to(dtype), dw.to(dtype) if weight is not None else None, db.to(dtype) if cache.has_bias else None


@mutant(batch_norm)
def bn_bessel_mixup_backward(dout, cache):
    """Bessel mix-up: divides the variance path by n where the forward used n - correction."""
    return _bn_backward(dout, cache, d=cache.x.numel() // max(cache.x.shape[1], 1))


@mutant(batch_norm)
def bn_drops_mean_term_backward(dout, cache):
    """Drops the path through the mean."""
    return _bn_backward(dout, cache, mean_term=False)


@mutant(batch_norm)
def bn_drops_variance_term_backward(dout, cache):
    """Drops the path through the variance."""
    return _bn_backward(dout, cache, var_term=False)


@mutant(batch_norm)
def bn_swapped_affine_grads_backward(dout, cache):
    """dweight and dbias swapped."""
    return _bn_backward(dout, cache, swap=True)


@mutant(batch_norm)
@torch.no_grad()
def bn_wrong_reduction_dim_backward(dout, cache):
    """Reduces over the channels (dim 1) instead of the rows."""
    xhat, dtype = batch_norm.normalised(cache), cache.dtype
    dy = dout.to(xhat.dtype)
    dbias, dweight = dy.sum(1, keepdim=True), (dy * xhat).sum(1, keepdim=True)
    scale = cache.rstd * cache.weight.to(xhat.dtype) if cache.weight is not None else cache.rstd
    scale = scale.reshape(1, -1, *[1] * (xhat.ndim - 2))
    N = xhat.shape[0]
    dx = scale * (dy - dbias / N - xhat * dweight / (N - cache.correction))
    C = xhat.shape[1]
    return (dx.to(dtype), dweight.reshape(-1)[:C].to(dtype) if cache.weight is not None else None,
            dbias.reshape(-1)[:C].to(dtype) if cache.has_bias else None)


@mutant(batch_norm)
@torch.no_grad()
def bn_spatial_dims_not_reduced_backward(dout, cache):
    """(N, C, *) layouts: dx's mean and variance paths sum over the rows only, not over L too."""
    xhat, dtype, N = batch_norm.normalised(cache), cache.dtype, cache.x.shape[0]
    if not cache.training:
        return batch_norm.backward(dout, cache)
    _, dw, db = batch_norm.backward(dout, cache)
    dy = dout.to(xhat.dtype)
    dbias, dweight = dy.sum(0, keepdim=True), (dy * xhat).sum(0, keepdim=True)  # (1, C, *)
    scale = cache.rstd * cache.weight.to(xhat.dtype) if cache.weight is not None else cache.rstd
    scale = scale.reshape(1, -1, *[1] * (xhat.ndim - 2))
    dx = scale * (dy - dbias / N - xhat * dweight / (N - cache.correction))
    return dx.to(dtype), dw, db


@mutant(batch_norm)
def bn_eval_mode_batch_statistics_backward(dout, cache):
    """Eval mode differentiated as if the batch statistics were used (the training backward)."""
    return _bn_backward(dout, cache._replace(training=True))


MUTANTS = [
    bn_bessel_mixup_backward,
    bn_drops_mean_term_backward,
    bn_drops_variance_term_backward,
    bn_swapped_affine_grads_backward,
    bn_wrong_reduction_dim_backward,
    bn_spatial_dims_not_reduced_backward,
    bn_eval_mode_batch_statistics_backward,
]
