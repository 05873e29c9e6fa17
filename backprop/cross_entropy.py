"""cross_entropy: softmax cross-entropy with class-index targets, the twin of ``F.cross_entropy``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check

REDUCTIONS = ("mean", "sum", "none")


class Args(NamedTuple):
    """forward's arguments, checked and prepared: what forward_math reads."""

    logits: torch.Tensor  # (N, C)
    targets: torch.Tensor  # (N,) int64 (uint8 targets converted), ignored rows replaced by class 0
    valid: torch.Tensor | None  # (N,) bool, False on ignored rows; None when no row is ignored
    count: int  # number of valid rows: the 'mean' denominator
    reduction: str
    label_smoothing: float


class Cache(NamedTuple):
    logits: torch.Tensor  # (N, C) the input itself, not a copy: backward recomputes softmax from it
    shift: torch.Tensor  # (N, 1) the row max m (0 where it is -inf or nan)
    logsum: torch.Tensor  # (N, 1) s = log(sum(exp(z - m))), so that log p = (z - m) - s
    targets: torch.Tensor  # (N,) int64, ignored rows replaced by class 0
    valid: torch.Tensor | None  # (N,) bool, False on ignored rows; None when no row is ignored
    count: int  # number of valid rows: the 'mean' denominator
    reduction: str
    label_smoothing: float
    versions: tuple[int, ...] = ()  # of logits and targets at forward; () for a cache built by hand


VERSIONED = ("logits", "targets")  # the caller's tensors, kept without a copy: backward refuses them edited


@_check.no_autograd
def forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Cache]:
    """With p = softmax(z_n), eps = label_smoothing and the target distribution
    q_n = (1 - eps) * onehot(y_n) + eps / C:
    loss_n = -sum_c q_n[c] * log p[c]   (0 on ignored rows);  mean divides by the valid rows.
    """
    return forward_math(prepare(logits, targets, reduction=reduction, ignore_index=ignore_index,
                                label_smoothing=label_smoothing))


def prepare(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Args:
    """Validate forward's arguments and prepare forward_math's. The ignored rows are found here,
    because the range check of the targets must skip them (one device sync)."""
    _check.floating("logits", logits)
    # uint8 as torch accepts it (int32 it refuses); gather needs int64, so a uint8 copy is widened
    _check.index("targets", targets, (torch.uint8, torch.int64))
    _check.ndim("logits", logits, 2, "(N, C)")
    N, C = logits.shape
    _check.shape("targets", targets, (N,), f"(N,) with N={N} rows of logits")
    _check.same_device(logits=logits, targets=targets)
    reduction = _check.str_option("reduction", reduction, REDUCTIONS)
    # an int, not a bool or a float: ignore_index=True or 1.0 would silently ignore class 1
    ignore_index = _check.int_option("ignore_index", ignore_index)
    label_smoothing = _check.float_option("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if C == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if targets.dtype == torch.uint8:
        targets = targets.long()  # (N,)
    if not 0 <= ignore_index < C and _check.all_in_range(targets, 0, C):
        # the common case in one pass: every target a class, so none equals ignore_index
        return Args(logits, targets, None, N, reduction, label_smoothing)
    valid = targets != ignore_index  # (N,)
    count = int(valid.sum())
    if count < N:
        safe = torch.where(valid, targets, 0)  # (N,) a gatherable index on ignored rows
    else:
        safe, valid = targets, None  # the common case: nothing to mask
    _check.in_range("targets", safe, 0, C, allowed=f"ignore_index={ignore_index}")
    return Args(logits, safe, valid, count, reduction, label_smoothing)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    """forward without the checks. No logits-sized buffer is kept: the cache holds the logits
    themselves and two (N, 1) columns."""
    logits, targets, valid, count, reduction, label_smoothing = a
    C = logits.shape[1]
    # a row of -inf would give -inf - -inf = nan: shift it by 0 instead (its loss is nan all the
    # same, as torch's). A +inf max is kept: inf - inf = nan for the whole row, which is torch's
    # answer too (log_softmax does not mask it); shifting by 0 would give an inf loss instead
    shift = logits.amax(1, keepdim=True).nan_to_num_(0.0, torch.inf, 0.0)  # (N, 1)
    shifted = logits - shift  # (N, C) a temporary, gone when forward returns
    # -sum_c log p[c] = sum_c (m - z_c) + C s: two non-negative terms, no cancellation
    smooth = -shifted.sum(1, keepdim=True) if label_smoothing > 0 else None  # (N, 1) before exp_
    logsum = shifted.exp_().sum(1, keepdim=True).log_()  # (N, 1)
    # -log p_y = (m - z_y) + s
    loss = (shift - logits.gather(1, targets[:, None])).add_(logsum)  # (N, 1)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + (label_smoothing / C) * smooth.add_(C * logsum)
    if valid is not None:
        loss = torch.where(valid[:, None], loss, 0.0)
    loss = loss.squeeze(1)  # (N,)
    if reduction != "none":
        loss = loss.sum() / count if reduction == "mean" else loss.sum()
    versions = _check.versions(logits, targets)
    return loss, Cache(logits, shift, logsum, targets, valid, count, reduction, label_smoothing, versions)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, None]:
    """dlogits[n, c] = w_n * (softmax(z_n)[c] - q_n[c]),  q_n = (1 - eps) onehot(y_n) + eps / C,
    w_n = dout / count ('mean'), dout ('sum') or dout[n] ('none'); w_n = 0 on ignored rows.
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "cross_entropy")
    _check.unmodified(cache, VERSIONED)
    N = cache.logits.shape[0]
    _check.dout(dout, (N,) if cache.reduction == "none" else (), cache.logits.dtype, cache.logits.device)


def backward_math(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, None]:
    logits, shift, logsum, targets, valid, count, reduction, eps, _ = cache
    C = logits.shape[1]
    w = dout / count if reduction == "mean" else dout  # () or (N,)
    if valid is not None:
        # select, not multiply: with every row ignored, dout / 0 is inf and 0 * inf is nan
        w = torch.where(valid, w, 0.0)  # (N,)
    if w.ndim:
        w = w[:, None]  # (N, 1), broadcast over C; a 0-d w broadcasts as it is

    dlogits = (logits - shift).sub_(logsum).exp_()  # (N, C) softmax = exp((z - m) - s)
    if eps > 0:
        dlogits -= eps / C
    dlogits *= w  # before the scatter: one elementwise chain, which torch.compile fuses into one pass
    # the target entry: softmax - q = (p - 1) + eps (1 - 1/C), with p - 1 = expm1(log p) exact:
    # p - 1 in floats cancels to 0 when p rounds to 1, expm1 keeps the small difference
    target = torch.expm1((logits.gather(1, targets[:, None]) - shift).sub_(logsum))  # (N, 1)
    if eps > 0:
        target += eps * (1 - 1 / C)
    dlogits.scatter_(1, targets[:, None], target * w)
    return dlogits, None


def jvp(tangents: tuple[torch.Tensor | None, None], cache: Cache) -> torch.Tensor | None:
    """Forward mode: row n moves by w_n <softmax(z_n) - q_n, t_n> = w_n (<p_n, t_n> - <q_n, t_n>),
    w_n = 1 / count ('mean', summed), 1 ('sum', summed; 'none', per row), 0 on ignored rows.
    p_n - q_n is backward_math's dlogits for dout = 1 per row (its expm1 keeps p_y - 1 exact).
    None when t_logits is None."""
    t_logits = tangents[0]
    if t_logits is None:
        return None
    N = cache.logits.shape[0]
    ones = cache.logits.new_ones(N)  # (N,) one unit of upstream gradient per row
    p_minus_q, _ = backward_math(ones, cache._replace(reduction="none"))  # (N, C), 0 on ignored rows
    rows = (p_minus_q * t_logits).sum(1)  # (N,)
    if cache.reduction == "none":
        return rows
    return rows.sum() / cache.count if cache.reduction == "mean" else rows.sum()
