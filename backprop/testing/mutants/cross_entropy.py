"""Known bugs in cross_entropy's kernel (see backprop.testing.mutants)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from backprop import cross_entropy
from backprop._check import no_autograd
from backprop.testing.catalogue import mutant


@torch.no_grad()  # the contract check of a dout that requires grad must not be what catches a mutant
def _ce_backward(dout, cache, *, denominator=None, smoothing_part=None, use_dout=True, soft_smoothing=True,
                 softmax_dim=1, smooth_unweighted=False, dtargets_scale=None):
    """cross_entropy's backward written plainly (q and the weights as full tensors), with knobs."""
    z = cache.logits if cache.logits.ndim >= 2 else cache.logits[None]  # (N, C, *)
    y = cache.targets if cache.logits.ndim >= 2 else cache.targets[None]
    valid = cache.valid if cache.valid is None or cache.logits.ndim >= 2 else cache.valid[None]
    C, eps = z.shape[1], cache.label_smoothing
    logp = torch.log_softmax(z, softmax_dim) if softmax_dim != 1 else z - cache.shift - cache.logsum
    w = (cache.weight if cache.weight is not None else z.new_ones(C)).view(C, *[1] * (z.ndim - 2))
    uniform = eps / C if smoothing_part is None else smoothing_part(eps, C)
    if y.is_floating_point():
        q = y * (1 - eps) + uniform if soft_smoothing else y
    else:
        q = torch.full_like(z, uniform).scatter_(1, y.unsqueeze(1), uniform + 1 - eps)
    wq = q * w
    if smooth_unweighted and not y.is_floating_point():  # only the one-hot part weighted
        wq = (q - uniform) * w + uniform
    d = dout if use_dout else torch.ones_like(dout)
    total = cache.total if denominator is None else denominator(cache)
    g = (d / total).to(d.dtype) if cache.reduction == "mean" else d
    g = g.reshape(z.shape[:1] + z.shape[2:]) if g.ndim else g
    if valid is not None:
        g = torch.where(valid, g, 0.0)
    g = g.unsqueeze(1) if g.ndim else g
    dlogits = ((logp.exp() * wq.sum(1, keepdim=True) - wq) * g).view(cache.logits.shape)
    if not y.is_floating_point():
        return dlogits, None
    scale = (1 - eps) if dtargets_scale is None else dtargets_scale(eps)
    return dlogits, (-scale * w * logp * g).view(cache.targets.shape)


def _rows(cache):
    return math.prod(cache.logits.shape[:1] + cache.logits.shape[2:]) if cache.logits.ndim >= 2 else 1


@mutant(cross_entropy)
def ce_mean_over_all_rows_backward(dout, cache):
    """'mean' divides by every row, counting the ignored rows."""
    return _ce_backward(dout, cache, denominator=_rows)


@mutant(cross_entropy)
def ce_forgets_1_over_n_backward(dout, cache):
    """'mean' forgets the 1/N."""
    return _ce_backward(dout, cache, denominator=lambda cache: 1)


@mutant(cross_entropy)
def ce_weighted_mean_over_count_backward(dout, cache):
    """With class weights, 'mean' divides by the count of kept rows, not the sum of their weights."""
    return _ce_backward(dout, cache, denominator=lambda cache: cache.count)


@mutant(cross_entropy)
def ce_smoothing_weight_backward(dout, cache):
    """Label smoothing spreads eps over the C - 1 other classes instead of all C."""
    return _ce_backward(dout, cache, smoothing_part=lambda eps, C: eps / max(C - 1, 1))


@mutant(cross_entropy)
def ce_smoothing_unweighted_backward(dout, cache):
    """With class weights, the smoothing term eps/C is left unweighted (torch weights it: eps/C w_c)."""
    return _ce_backward(dout, cache, smooth_unweighted=True)


@mutant(cross_entropy)
def ce_soft_targets_unsmoothed_backward(dout, cache):
    """Probability targets: dlogits uses q itself, missing the smoothing (1 - eps) q + eps/C."""
    return _ce_backward(dout, cache, soft_smoothing=False)


@mutant(cross_entropy)
def ce_dtargets_unsmoothed_backward(dout, cache):
    """Probability targets: dtargets = -w log p, missing the (1 - eps) of the smoothed targets."""
    return _ce_backward(dout, cache, dtargets_scale=lambda eps: 1.0)


@mutant(cross_entropy)
def ce_kdim_softmax_last_dim_backward(dout, cache):
    """(N, C, d1..dK) logits: softmax over the last dim instead of the class dim 1."""
    return _ce_backward(dout, cache, softmax_dim=-1)


@mutant(cross_entropy)
def ce_drops_dout_backward(dout, cache):
    """Drops the upstream gradient: treats dloss as 1."""
    return _ce_backward(dout, cache, use_dout=False)


def ce_unshifted_forward(logits, targets, *, weight=None, reduction="mean", ignore_index=-100,
                         label_smoothing=0.0):
    """Unshifted exp: log(sum(exp(z))) overflows for large logits."""
    _, cache = cross_entropy.forward(logits, targets, weight=weight, reduction=reduction,
                                     ignore_index=ignore_index, label_smoothing=label_smoothing)
    logsum = torch.log(torch.exp(logits).sum(1, keepdim=True))
    logprobs = logits - logsum
    loss = F.nll_loss(logprobs, targets, ignore_index=ignore_index, reduction=reduction)
    if label_smoothing > 0:
        smooth = -logprobs.sum(1)
        smooth = torch.where(targets != ignore_index, smooth, 0.0)
        if reduction != "none":
            smooth = smooth.sum() / (cache.count if reduction == "mean" else 1)
        loss = (1 - label_smoothing) * loss + label_smoothing / logits.shape[1] * smooth
    return loss, cache._replace(shift=torch.zeros_like(cache.shift), logsum=logsum)


ce_unshifted = SimpleNamespace(forward=no_autograd(ce_unshifted_forward), backward=cross_entropy.backward,
                               Cache=cross_entropy.Cache, __name__="ce_unshifted",
                               __doc__=ce_unshifted_forward.__doc__, op="cross_entropy")


MUTANTS = [
    ce_mean_over_all_rows_backward,
    ce_forgets_1_over_n_backward,
    ce_smoothing_weight_backward,
    ce_unshifted,
    ce_drops_dout_backward,
    ce_weighted_mean_over_count_backward,
    ce_smoothing_unweighted_backward,
    ce_soft_targets_unsmoothed_backward,
    ce_dtargets_unsmoothed_backward,
    ce_kdim_softmax_last_dim_backward,
]
