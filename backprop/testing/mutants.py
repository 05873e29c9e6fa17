"""A catalogue of plausible backward bugs: each a small variant of a correct kernel, with a
one-line docstring naming the mistake. tests/test_mutants.py asserts the suite catches every one,
and the pytest plugin (backprop.pytest_plugin) reruns the catalogue on a user's machine before it
trusts a green run ("suite power").

    stage = first_catch(m, max_examples=300)   # "gradient", "forward", ... or None: it survived
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from backprop import batch_norm, cross_entropy, embedding, linear, logsumexp, tanh
from backprop._check import no_autograd
from backprop.testing.catalogue import first_catch, mutant  # noqa: F401 (first_catch: re-exported)

# ---------------------------------------------------------------- cross_entropy


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


# ---------------------------------------------------------------- logsumexp


@mutant(logsumexp)
@torch.no_grad()  # caught by its maths, not by recording history
def lse_keepdim_broadcast_backward(dout, cache):
    """Wrong keepdim broadcast: puts the reduced dim back last instead of where it was."""
    x, shift, sumexp, dims, keepdim, _ = cache
    if dims and not keepdim:
        dout = dout.unsqueeze(-1)
    return (torch.exp(x - shift) * (dout / sumexp),)


@mutant(logsumexp)
@torch.no_grad()  # caught by its maths, not by recording history
def lse_unnormalised_backward(dout, cache):
    """Gradient exp(x) without normalising by the sum."""
    x, shift, sumexp, dims, keepdim, _ = cache
    if dims and not keepdim:
        dout = dout.reshape(shift.shape)
    return (torch.exp(x - shift) * dout,)


# ---------------------------------------------------------------- batch_norm


@torch.no_grad()  # a mutant is caught by its maths, not by recording history
def _bn_backward(dout, cache, *, d=None, mean_term=True, var_term=True, swap=False, dims=None):
    xhat, rstd, weight, correction, dtype = cache.xhat, cache.rstd, cache.weight, cache.correction, cache.dtype
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
    return _bn_backward(dout, cache, d=cache.xhat.numel() // max(cache.xhat.shape[1], 1))


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
    xhat, dtype = cache.xhat, cache.dtype
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
    xhat, dtype, N = cache.xhat, cache.dtype, cache.xhat.shape[0]
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


# ---------------------------------------------------------------- tanh


@mutant(tanh)
def tanh_one_plus_backward(dout, cache):
    """1 + y**2 instead of 1 - y**2."""
    return ((1 + cache.out * cache.out) * dout,)


def tanh_input_forward(x):
    """Uses the input where the rule needs the output: caches x, not tanh(x)."""
    return torch.tanh(x), tanh.Cache(x)


tanh_uses_input = SimpleNamespace(forward=no_autograd(tanh_input_forward), backward=tanh.backward,
                                  Cache=tanh.Cache,
                                  __name__="tanh_uses_input", __doc__=tanh_input_forward.__doc__, op="tanh")


# ---------------------------------------------------------------- linear


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


# ---------------------------------------------------------------- embedding


@mutant(embedding)
@torch.no_grad()
def embedding_overwrite_backward(dout, cache):
    """Overwrites instead of accumulating repeated indices: dweight[idx] = dout."""
    indices, V, E, padding_idx = cache.indices, cache.num_embeddings, cache.embedding_dim, cache.padding_idx
    dweight = dout.new_zeros(V, E)
    dweight[indices.reshape(-1)] = dout.reshape(-1, E)
    if cache.scale_grad_by_freq:
        dweight /= torch.bincount(indices.reshape(-1), minlength=V).clamp(min=1)[:, None].to(dout.dtype)
    if padding_idx is not None:
        dweight[padding_idx] = 0
    return None, dweight


@mutant(embedding)
def embedding_padding_not_zeroed_backward(dout, cache):
    """The padding row is not zeroed."""
    _, dweight = embedding.backward(dout, cache._replace(padding_idx=None))
    return None, dweight


def _freq_backward(dout, cache, count):
    _, dweight = embedding.backward(dout, cache._replace(scale_grad_by_freq=False))
    if cache.scale_grad_by_freq:
        dweight = dweight / count(cache.indices.reshape(-1), cache.num_embeddings)[:, None].to(dout.dtype)
    return None, dweight


@mutant(embedding)
def embedding_freq_total_count_backward(dout, cache):
    """scale_grad_by_freq divides by the number of positions, not by each row's own count."""
    return _freq_backward(dout, cache, lambda idx, V: torch.full((V,), max(idx.numel(), 1)))


@mutant(embedding)
def embedding_freq_unclamped_count_backward(dout, cache):
    """scale_grad_by_freq divides by a count of 0 for rows no index names: 0 / 0 = nan there."""
    return _freq_backward(dout, cache, lambda idx, V: torch.bincount(idx, minlength=V))


MUTANTS = [
    ce_mean_over_all_rows_backward, ce_forgets_1_over_n_backward, ce_smoothing_weight_backward,
    ce_unshifted, ce_drops_dout_backward, ce_weighted_mean_over_count_backward,
    ce_smoothing_unweighted_backward, ce_soft_targets_unsmoothed_backward, ce_dtargets_unsmoothed_backward,
    ce_kdim_softmax_last_dim_backward,
    lse_keepdim_broadcast_backward, lse_unnormalised_backward,
    bn_bessel_mixup_backward, bn_drops_mean_term_backward, bn_drops_variance_term_backward,
    bn_swapped_affine_grads_backward, bn_wrong_reduction_dim_backward,
    bn_spatial_dims_not_reduced_backward, bn_eval_mode_batch_statistics_backward,
    tanh_one_plus_backward, tanh_uses_input,
    linear_missing_transpose_backward, linear_bias_first_row_backward,
    embedding_overwrite_backward, embedding_padding_not_zeroed_backward,
    embedding_freq_total_count_backward, embedding_freq_unclamped_count_backward,
]
