"""cross_entropy: softmax cross-entropy with class-index targets, the twin of ``F.cross_entropy``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check

REDUCTIONS = ("mean", "sum", "none")


class Cache(NamedTuple):
    logprobs: torch.Tensor  # (N, C) log_softmax(logits): the one logits-sized buffer kept
    targets: torch.Tensor  # (N,) int64, ignored rows replaced by class 0
    valid: torch.Tensor | None  # (N,) bool, False on ignored rows; None when no row is ignored
    count: int  # number of valid rows: the 'mean' denominator
    reduction: str
    label_smoothing: float


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
    return forward_math(*check_forward(logits, targets, reduction=reduction, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing))


def check_forward(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """Validate forward's arguments; returns forward_math's. The ignored rows are found here,
    because the range check of the targets must skip them (one device sync)."""
    _check.floating("logits", logits)
    _check.index("targets", targets, (torch.int64,))
    _check.ndim("logits", logits, 2, "(N, C)")
    N, C = logits.shape
    _check.shape("targets", targets, (N,), f"(N,) with N={N} rows of logits")
    _check.same_device(logits=logits, targets=targets)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if C == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    if not 0 <= ignore_index < C and _check.all_in_range(targets, 0, C):
        # the common case in one pass: every target a class, so none equals ignore_index
        return logits, targets, targets, None, N, reduction, ignore_index, float(label_smoothing)
    valid = targets != ignore_index  # (N,)
    count = int(valid.sum())
    if count < N:
        safe = torch.where(valid, targets, 0)  # (N,) a gatherable index on ignored rows
    else:
        safe, valid = targets, None  # the common case: nothing to mask
    _check.in_range("targets", safe, 0, C, allowed=f"ignore_index={ignore_index}")
    return logits, targets, safe, valid, count, reduction, ignore_index, float(label_smoothing)


def forward_math(logits, targets, safe, valid, count, reduction, ignore_index, label_smoothing):
    """forward without the checks: safe = targets with ignored rows set to 0, valid = the mask
    (None when no row is ignored), count = the number of valid rows."""
    C = logits.shape[1]
    logprobs = torch.log_softmax(logits, dim=1)  # (N, C) shifted by the row max inside: stable
    # -logprobs[n, y_n], 0 on ignored rows, reduced over the valid rows
    loss = torch.nn.functional.nll_loss(logprobs, targets, ignore_index=ignore_index, reduction=reduction)
    if label_smoothing > 0:
        smooth = -logprobs.sum(1)  # (N,) = -sum_c log p[c]
        if valid is not None:
            smooth = torch.where(valid, smooth, 0.0)
        if reduction != "none":
            smooth = smooth.sum() / (count if reduction == "mean" else 1)
        loss = (1 - label_smoothing) * loss + (label_smoothing / C) * smooth
    return loss, Cache(logprobs, safe, valid, count, reduction, label_smoothing)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, None]:
    """dlogits[n, c] = w_n * (softmax(z_n)[c] - q_n[c]),  q_n = (1 - eps) onehot(y_n) + eps / C,
    w_n = dout / count ('mean'), dout ('sum') or dout[n] ('none'); w_n = 0 on ignored rows.
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout, cache: Cache) -> None:
    N = cache.logprobs.shape[0]
    _check.dout(dout, (N,) if cache.reduction == "none" else (), cache.logprobs.dtype)


def backward_math(dout, cache: Cache):
    logprobs, targets, valid, count, reduction, eps = cache
    C = logprobs.shape[1]
    w = dout / count if reduction == "mean" else dout  # () or (N,)
    if valid is not None:
        # select, not multiply: with every row ignored, dout / 0 is inf and 0 * inf is nan
        w = torch.where(valid, w, 0.0)  # (N,)
    if w.ndim:
        w = w[:, None]  # (N, 1), broadcast over C; a 0-d w broadcasts as it is

    dlogits = logprobs.exp()  # (N, C) softmax, from the shifted log-probabilities
    if eps > 0:
        dlogits -= eps / C
    # the target entry: softmax - q = (p - 1) + eps (1 - 1/C), with p - 1 = expm1(log p) exact:
    # p - 1 in floats cancels to 0 when p rounds to 1, expm1 keeps the small difference
    target = torch.expm1(logprobs.gather(1, targets[:, None]))  # (N, 1)
    if eps > 0:
        target += eps * (1 - 1 / C)
    dlogits.scatter_(1, targets[:, None], target)
    dlogits *= w
    return dlogits, None
