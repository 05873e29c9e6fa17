"""cross_entropy: softmax cross-entropy, the twin of ``F.cross_entropy``.

logits (N, C), (C,) unbatched, or (N, C, d1, ..., dK): the classes along dim 1 (dim 0 unbatched).
targets: class indices of logits' shape without the class dim ((N,), (), (N, d1, ..., dK)), or
class probabilities of logits' own shape. A "row" is one position: N rows, 1, or N d1 ... dK.
Every reduction runs along the class dim with keepdim, so the K-dim case needs no permute or copy.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from backprop import _check

REDUCTIONS = ("mean", "sum", "none")


class Args(NamedTuple):
    """forward's arguments, checked and prepared: what forward_math reads."""

    logits: torch.Tensor  # (N, C), (C,) or (N, C, d1..dK), as given
    # class indices: int64 (uint8 widened), ignored entries replaced by class 0; probabilities: as given
    targets: torch.Tensor
    weight: torch.Tensor | None  # (C,) class weights, as given
    valid: torch.Tensor | None  # targets' shape, bool, False where ignored; None when nothing is ignored
    count: int  # rows kept: the 'mean' denominator without weight (every row for probabilities)
    reduction: str
    label_smoothing: float


class Cache(NamedTuple):
    logits: torch.Tensor  # the input itself, not a copy: backward recomputes softmax from it
    shift: torch.Tensor  # (N, 1, d1..dK) the row max m (0 where it is -inf or nan); (1, 1) unbatched
    logsum: torch.Tensor  # like shift: s = log(sum(exp(z - m))), so that log p = (z - m) - s
    targets: torch.Tensor  # Args.targets
    weight: torch.Tensor | None  # (C,) the input itself
    valid: torch.Tensor | None  # Args.valid
    count: int  # Args.count
    # the 'mean' denominator: count, or the kept rows' weight sum (0-d; nan where that sum is 0 with
    # label smoothing, torch's 0 / 0)
    total: float | torch.Tensor
    reduction: str
    label_smoothing: float
    versions: tuple[int | None, ...] = ()  # of logits, targets, weight at forward; () for a cache built by hand


# the caller's tensors, kept without a copy: backward refuses them edited
VERSIONED = ("logits", "targets", "weight")


@_check.no_autograd
def forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Cache]:
    """With p = softmax(z_n), eps = label_smoothing, class weights w (ones by default) and the
    target distribution q_n = (1 - eps) onehot(y_n) + eps / C (indices) or (1 - eps) t_n + eps / C
    (probabilities t_n):  loss_n = -sum_c w_c q_n[c] log p[c]   (0 on ignored rows).
    'mean' divides by sum_n w[y_n] over the kept rows (their count without weight; a sum of 0 with
    smoothing gives nan, as torch's nll term 0 / 0); for probability targets by the number of rows.
    ignore_index must be negative for probabilities.
    """
    return forward_math(prepare(logits, targets, weight=weight, reduction=reduction,
                                ignore_index=ignore_index, label_smoothing=label_smoothing))


def rows_shape(logits: torch.Tensor) -> tuple[int, ...]:
    """The shape of one loss per row: logits' shape without the class dim."""
    return tuple(logits.shape[:1] + logits.shape[2:]) if logits.ndim >= 2 else ()


def check(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Args:
    """Every check that reads no tensor values (dtypes, shapes, devices, options): the Args as if
    no row were ignored. prepare adds the range check and the ignored rows; the custom op
    (backprop.library) adds them on the device, without a sync."""
    _check.floating("logits", logits)
    _check.tensor("targets", targets)
    if logits.ndim == 0:
        raise ValueError("logits must be 1-D (C,), 2-D (N, C) or (N, C, d1, ..., dK), got a 0-D tensor")
    C = logits.shape[1] if logits.ndim >= 2 else logits.shape[0]
    rows = rows_shape(logits)
    soft = targets.is_floating_point()
    if soft and tuple(targets.shape) == tuple(logits.shape):
        _check.same_dtype("targets", targets, "logits", logits)
    elif soft and tuple(targets.shape) == rows:
        raise TypeError(f"targets must be class probabilities of logits' shape {tuple(logits.shape)}, "
                        f"or an integer index tensor of dtype torch.uint8 or torch.int64, "
                        f"got dtype {targets.dtype}")
    elif soft:
        _check.shape("targets", targets, tuple(logits.shape), "of logits (class probabilities)")
    else:
        # uint8 as torch accepts it (int32 it refuses); gather needs int64, so a uint8 copy is widened
        _check.index("targets", targets, (torch.uint8, torch.int64))
        if logits.ndim == 2:
            legend = f"(N,) with N={rows[0]} rows of logits"
        elif logits.ndim == 1:
            legend = "(0-D) for unbatched logits (C,)"
        else:
            legend = "(N, d1, ..., dK): logits' shape without the class dim 1"
        _check.shape("targets", targets, rows, legend)
    if weight is not None:
        _check.floating("weight", weight)
        _check.same_dtype("weight", weight, "logits", logits)
        _check.shape("weight", weight, (C,), f"(C,) with C={C} classes of logits")
    _check.same_device(logits=logits, targets=targets, weight=weight)
    reduction = _check.str_option("reduction", reduction, REDUCTIONS)
    # an int, not a bool or a float: ignore_index=True or 1.0 would silently ignore class 1
    ignore_index = _check.int_option("ignore_index", ignore_index)
    label_smoothing = _check.float_option("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if C == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if soft and ignore_index >= 0:
        raise ValueError(f"ignore_index must be negative with class-probability targets (nothing to "
                         f"ignore, as in torch), got {ignore_index}")
    if targets.dtype == torch.uint8:
        targets = targets.long()
    return Args(logits, targets, weight, None, math.prod(rows), reduction, label_smoothing)


def prepare(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Args:
    """Validate forward's arguments and prepare forward_math's. The ignored rows are found here,
    because the range check of the targets must skip them (one device sync)."""
    a = check(logits, targets, weight=weight, reduction=reduction, ignore_index=ignore_index,
              label_smoothing=label_smoothing)
    if a.targets.is_floating_point():
        return a  # probabilities: nothing to read
    targets, C = a.targets, (logits.shape[1] if logits.ndim >= 2 else logits.shape[0])
    if not 0 <= ignore_index < C and _check.all_in_range(targets, 0, C):
        # the common case in one pass: every target a class, so none equals ignore_index
        return a
    valid = targets != ignore_index  # targets' shape
    count = int(valid.sum())
    if count < a.count:
        safe = torch.where(valid, targets, 0)  # a gatherable index on ignored rows
    else:
        safe, valid = targets, None  # the common case: nothing to mask
    _check.in_range("targets", safe, 0, C, allowed=f"ignore_index={ignore_index}")
    return a._replace(targets=safe, valid=valid, count=count)


def _classes(t: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The classes along dim 1: for unbatched logits (C,), t as one row ((1, C), or (1,) for a
    0-d target); else t itself."""
    return t.unsqueeze(0) if logits.ndim == 1 else t


def _along_classes(weight: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) as (C, 1, ..., 1): broadcasts along dim 1 of an ndim-D (N, C, d1..dK) tensor."""
    return weight.view(weight.shape[0], *[1] * (ndim - 2))


def _dot_classes(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_c x[:, c] w_c with keepdim, (N, 1, d1..dK): a matrix-vector product, so no temporary
    of x's size (a broadcast multiply would make one)."""
    if x.ndim == 2:
        return (x @ weight).unsqueeze(1)  # (N, 1)
    return (weight @ x.flatten(2)).view(x.shape[0], 1, *x.shape[2:])  # (C,) @ (N, C, D) -> (N, D)


def _target_weights(q: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """w_c q'_c with q' = (1 - eps) q + eps / C, for probability targets q (N, C, d1..dK): a new
    tensor, or q itself when there is nothing to apply (never written to)."""
    C = q.shape[1]
    qw = q * (1 - eps) + eps / C if eps > 0 else q
    if weight is not None:
        w = _along_classes(weight, q.ndim)
        qw = qw.mul_(w) if eps > 0 else q * w
    return qw


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    """forward without the checks. No logits-sized buffer is kept: the cache holds the logits
    themselves and two columns of one entry per row."""
    logits, targets, weight, valid, count, reduction, eps = a
    z, y = _classes(logits, logits), _classes(targets, logits)  # (N, C, d1..dK), (N, d1..dK) or (N, C, d1..dK)
    kept = None if valid is None else _classes(valid, logits)  # (N, d1..dK) bool
    C = z.shape[1]
    # a row of -inf would give -inf - -inf = nan: shift it by 0 instead (its loss is nan all the
    # same, as torch's). A +inf max is kept: inf - inf = nan for the whole row, which is torch's
    # answer too (log_softmax does not mask it); shifting by 0 would give an inf loss instead
    shift = z.amax(1, keepdim=True).nan_to_num_(0.0, torch.inf, 0.0)  # (N, 1, *)
    shifted = z - shift  # (N, C, *) a temporary, gone when forward returns
    total = count
    if y.is_floating_point():
        qw = _target_weights(y, weight, eps)  # (N, C, *)
        logsum = shifted.exp().sum(1, keepdim=True).log_()  # (N, 1, *) its temporary freed here
        # -sum_c qw_c log p_c = sum_c qw_c (s + (m - z_c)): non-negative terms for qw >= 0. One
        # product per class, as torch's -q log p: an infinite q_c meets log p_c (never 0 with two or
        # more classes), not m - z_c, which is 0 at the max (inf * 0 = nan where torch gives inf)
        loss = shifted.neg_().add_(logsum).mul_(qw).sum(1, keepdim=True)  # (N, 1, *)
    else:
        # -sum_c w_c log p[c] = sum_c w_c (m - z_c) + s sum_c w_c: two non-negative terms (w >= 0)
        smooth = None
        if eps > 0:
            smooth = -shifted.sum(1, keepdim=True) if weight is None else -_dot_classes(shifted, weight)
        logsum = shifted.exp_().sum(1, keepdim=True).log_()  # (N, 1, *)
        y1 = y.unsqueeze(1)  # (N, 1, *)
        # -log p_y = (m - z_y) + s
        loss = (shift - z.gather(1, y1)).add_(logsum)  # (N, 1, *)
        if weight is not None:
            wy = weight[y1]  # (N, 1, *) w[y_n]
            loss = loss * wy
            wy_kept = wy if kept is None else torch.where(kept.unsqueeze(1), wy, 0.0)
            total = wy_kept.sum(dtype=_check.opmath(wy.dtype))  # () the weighted 'mean' denominator
        if eps > 0:
            sum_w = C if weight is None else weight.sum()
            loss = (1 - eps) * loss + (eps / C) * smooth.add_(logsum * sum_w)
            if weight is not None and reduction == "mean":
                # torch divides its nll and smoothing terms by the total apart: a total of 0 (every kept
                # target's weight 0) makes the nll term 0 / 0 = nan, where the sum over 0 is inf. A nan
                # total gives that nan here and in backward (every kept row's gradient), and 0 / 0 is
                # all it changes: a total of inf stays inf
                total = total / (total != 0)
    if kept is not None:
        loss = torch.where(kept.unsqueeze(1), loss, 0.0)
    if reduction != "none":  # over every row: (N, 1, *) needs no squeeze first
        loss = (loss.sum() / total).to(loss.dtype) if reduction == "mean" else loss.sum()
    else:
        loss = loss.squeeze(1) if logits.ndim > 1 else loss.reshape(())  # (N, *) or () unbatched
    versions = _check.versions(logits, targets, weight)
    return loss, Cache(logits, shift, logsum, targets, weight, valid, count, total, reduction, eps, versions)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With g_n = dout / total ('mean'), dout ('sum') or dout[n] ('none'), 0 on ignored rows,
    qw_n[c] = w_c q_n[c] and S_n = sum_c qw_n[c]:
        dlogits[n, c] = g_n (softmax(z_n)[c] S_n - qw_n[c])    (S_n = 1, qw = q without weight)
        dtargets[n, c] = -g_n (1 - eps) w_c log softmax(z_n)[c]  (probability targets; else None)
    Index targets: S_n = (1 - eps) w[y_n] + eps/C sum_c w_c; without smoothing g_n w[y_n] (p - onehot).
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "cross_entropy")
    _check.unmodified(cache, VERSIONED)
    rows = rows_shape(cache.logits)
    _check.dout(dout, rows if cache.reduction == "none" else (), cache.logits.dtype, cache.logits.device)


def backward_math(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits, shift, logsum, targets, weight, valid, _, total, reduction, eps, _ = cache
    z, y = _classes(logits, logits), _classes(targets, logits)  # (N, C, *), (N, *) or (N, C, *)
    valid = None if valid is None else _classes(valid, logits)  # (N, *)
    C = z.shape[1]
    # a weight sum is kept in float32 for 16-bit logits: divide there, round once
    g = (dout / total).to(dout.dtype) if reduction == "mean" else dout  # () or (N, *)
    if g.ndim == 0 and reduction == "none":
        g = g.reshape(1)  # unbatched: one row
    if y.is_floating_point():
        return _soft_backward(g, z, shift, logsum, y, weight, eps, logits, targets)
    y1 = y.unsqueeze(1)  # (N, 1, *)
    smoothed_weights = weight is not None and eps > 0
    if weight is not None and not smoothed_weights:
        g = g * weight[y]  # (N, *) w[y_n] scales the whole row
    if valid is not None:
        # select, not multiply: with every row ignored, dout / 0 is inf and 0 * inf is nan
        g = torch.where(valid, g, 0.0)  # (N, *)
    if g.ndim:
        g = g.unsqueeze(1)  # (N, 1, *), broadcast over C; a 0-d g broadcasts as it is

    dlogits = (z - shift).sub_(logsum).exp_()  # (N, C, *) softmax = exp((z - m) - s)
    # the target entry's p - 1 = expm1(log p) exact: p - 1 in floats cancels to 0 when p rounds
    # to 1, expm1 keeps the small difference
    # in opmath (float32 for 16-bit logits, one entry a row): with smoothing, (p_y - 1) + eps (1 - 1/C)
    # cancels, and a bfloat16 expm1 (8 bits) left 4x torch's error (found by hypothesis)
    logp_y = (z.gather(1, y1).to(_check.opmath(z.dtype)) - shift).sub_(logsum)  # (N, 1, *)
    if smoothed_weights:
        # p S - eps/C w - (1 - eps) w_y onehot,  S = (1 - eps) w_y + eps/C sum_c w_c
        wy = weight[y1]  # (N, 1, *)
        S = (1 - eps) * wy + (eps / C) * weight.sum()
        dlogits.mul_(g * S).addcmul_(g * (-eps / C), _along_classes(weight, z.ndim))
        # target: (1 - eps) w_y (p_y - 1) + eps/C (p_y sum_c w_c - w_y)
        target = (1 - eps) * wy * torch.expm1(logp_y) + (eps / C) * (logp_y.exp() * weight.sum() - wy)
    else:
        if eps > 0:
            dlogits -= eps / C
        dlogits *= g  # before the scatter: one elementwise chain, which torch.compile fuses into one pass
        # softmax - q = (p - 1) + eps (1 - 1/C) on the target
        target = torch.expm1(logp_y)
        if eps > 0:
            target += eps * (1 - 1 / C)
    dlogits.scatter_(1, y1, (target * g).to(dlogits.dtype))
    return (dlogits if z is logits else dlogits.view(logits.shape)), None


def _soft_backward(g, z, shift, logsum, q, weight, eps, logits, targets):
    """Probability targets: dlogits = g (p S - qw), dtargets = -g (1 - eps) w log p."""
    if g.ndim:
        g = g.unsqueeze(1)  # (N, 1, *)
    qw = _target_weights(q, weight, eps)  # (N, C, *)
    S = qw.sum(1, keepdim=True)  # (N, 1, *)
    logp = (z - shift).sub_(logsum)  # (N, C, *)
    dtargets = logp * (g * -(1 - eps))  # (N, C, *)
    if weight is not None:
        dtargets *= _along_classes(weight, z.ndim)
    dlogits = logp.exp_().mul_(S).sub_(qw).mul_(g)  # (N, C, *) the buffer of logp, reused
    return dlogits.view(logits.shape), dtargets.view(targets.shape)


def jvp(
    tangents: tuple[torch.Tensor | None, torch.Tensor | None], cache: Cache
) -> torch.Tensor | None:
    """Forward mode: row n moves by <dlogits_n, t_logits_n> + <dtargets_n, t_targets_n> with
    backward's rows at g_n = 1 ('none'), then the reduction ('mean' divides by total):
    w_n (<softmax(z_n) S_n - qw_n, t_n>) - (1 - eps) <w log p_n, t_q,n> (probability targets).
    None when every tangent is None."""
    tangents = (*tangents, None)[:2]
    if all(t is None for t in tangents):
        return None
    rows = rows_shape(cache.logits)
    ones = cache.logits.new_ones(rows)  # one unit of upstream gradient per row
    grads = backward_math(ones, cache._replace(reduction="none"))
    class_dim = 1 if cache.logits.ndim >= 2 else 0
    moved = sum((d * t).sum(class_dim) for d, t in zip(grads, tangents) if d is not None and t is not None)
    if not isinstance(moved, torch.Tensor):  # a tangent only for an input without a gradient
        moved = cache.logits.new_zeros(rows)
    if cache.reduction == "none":
        return moved
    return (moved.sum() / cache.total).to(moved.dtype) if cache.reduction == "mean" else moved.sum()
