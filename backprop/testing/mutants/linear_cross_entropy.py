"""Known bugs in linear_cross_entropy's kernel (see backprop.testing.mutants). Two of them swap
one of the kernel's private helpers for a wrong one while forward and backward run."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from unittest import mock

import torch

from backprop import linear_cross_entropy as lce
from backprop.testing.catalogue import mutant


def _patched(name: str, helper: str, replacement, doc: str) -> SimpleNamespace:
    """linear_cross_entropy with its helper ``helper`` replaced while forward and backward run."""

    def during(fn):
        @functools.wraps(fn)  # forward's signature: the oracle reads it
        def run(*args, **kwargs):
            with mock.patch.object(lce, helper, replacement):
                return fn(*args, **kwargs)
        return run

    return SimpleNamespace(forward=during(lce.forward), backward=during(lce.backward), Cache=lce.Cache,
                           __name__=name, __doc__=doc, op="linear_cross_entropy")


def _overlapping_ranges(N, chunk):
    """Each chunk after the first starts one row early: the boundary row is summed twice."""
    return [(max(i - 1, 0), min(i + chunk, N)) for i in range(0, N, chunk)]


lce_chunk_boundary_off_by_one = _patched(
    "lce_chunk_boundary_off_by_one", "_chunk_ranges", _overlapping_ranges,
    "A chunk boundary off by one: chunks overlap by a row, so a reduced loss, dW and db count the "
    "boundary rows twice.")


def _dlogits_smoothing_unweighted(logp, g, targets, cw, eps):
    """The uniform part of q as eps / V, without the class weights w[c] (torch weights it)."""
    V = logp.shape[1]
    total = V if cw is None else cw.sum()
    wy = 1.0 if cw is None else cw[targets, None]
    a = (1 - eps) * wy + (eps / V) * total if eps > 0 else wy
    logpy = logp.gather(1, targets[:, None])
    dz = logp.exp_().mul_(g * a)
    if eps > 0:
        dz -= g * (eps / V)
    target = (1 - eps) * wy * torch.expm1(logpy)
    if eps > 0:
        target = target + (eps / V) * (total * logpy.exp() - wy)
    return dz.scatter_(1, targets[:, None], target * g)


lce_smoothing_unweighted = _patched(
    "lce_smoothing_unweighted", "_dlogits_", _dlogits_smoothing_unweighted,
    "With class weights, the smoothing part of dlogits is eps/V, not eps/V w[c] (the loss is right).")


@mutant(lce)
def lce_mean_over_all_rows_forward(x, linear_weight, targets, linear_bias=None, **options):
    """'mean' scales the gradients by 1/N, not 1/(kept targets' total weight) (the loss is right)."""
    out, cache = lce.forward(x, linear_weight, targets, linear_bias, **options)
    if cache.reduction != "mean":
        return out, cache
    kept = targets != options.get("ignore_index", -100)
    w = options.get("weight")
    f = float(kept.sum() if w is None else w[targets[kept]].sum()) / x.shape[0]
    return out, cache._replace(dx=cache.dx * f, dlinear_weight=cache.dlinear_weight * f,
                               dlinear_bias=None if cache.dlinear_bias is None else cache.dlinear_bias * f)


@mutant(lce)
def lce_drops_dbias_backward(dout, cache):
    """dbias missing: None for the bias gradient."""
    dx, dweight, _, _ = lce.backward(dout, cache)
    return dx, dweight, None, None


@mutant(lce)
def lce_drops_dout_backward(dout, cache):
    """For a scalar loss, returns the gradients forward computed at dloss = 1, ignoring dout."""
    if cache.reduction == "none":
        return lce.backward(dout, cache)
    db = cache.dlinear_bias
    return cache.dx.clone(), cache.dlinear_weight.clone(), None, None if db is None else db.clone()


@mutant(lce)
def lce_consumes_its_cache_backward(dout, cache, release=False):
    """Scales the cached gradients in place on every call, as if each were the cache's last use
    (release=True always): a second backward on the cache, the kernel's or through a graph kept
    with retain_graph=True, scales them again."""
    return lce.backward_math(dout, cache, release=True)


MUTANTS = [
    lce_chunk_boundary_off_by_one,
    lce_mean_over_all_rows_forward,
    lce_drops_dbias_backward,
    lce_drops_dout_backward,
    lce_smoothing_unweighted,
    lce_consumes_its_cache_backward,
]
