"""cross_entropy: softmax cross-entropy with class-index targets, the twin of ``F.cross_entropy``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check

REDUCTIONS = ("mean", "sum", "none")


class Cache(NamedTuple):
    logprobs: torch.Tensor  # (N, C) log_softmax(logits): the one logits-sized buffer kept
    targets: torch.Tensor  # (N,) int64, ignored rows replaced by class 0
    valid: torch.Tensor  # (N,) bool, False on rows whose target is ignore_index
    count: torch.Tensor  # () number of valid rows: the 'mean' denominator
    reduction: str
    label_smoothing: float


@torch.no_grad()
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
    _check.in_range("targets", targets, 0, C, allowed=ignore_index)

    valid = targets != ignore_index  # (N,)
    safe = torch.where(valid, targets, 0)  # (N,) a gatherable index on ignored rows
    logprobs = torch.log_softmax(logits, dim=1)  # (N, C) shifted by the row max inside: stable
    nll = -logprobs.gather(1, safe[:, None]).squeeze(1)  # (N,)
    if label_smoothing > 0:
        smooth = -logprobs.sum(1)  # (N,) = -sum_c log p[c]
        loss = (1 - label_smoothing) * nll + (label_smoothing / C) * smooth
    else:
        loss = nll
    loss = torch.where(valid, loss, 0.0)  # (N,)
    count = valid.sum()
    if reduction == "mean":
        loss = loss.sum() / count  # 0 / 0 = nan when every row is ignored, as in torch
    elif reduction == "sum":
        loss = loss.sum()
    return loss, Cache(logprobs, safe, valid, count, reduction, float(label_smoothing))


@torch.no_grad()
def backward(dout: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, None]:
    """dlogits[n, c] = w_n * (softmax(z_n)[c] - q_n[c]),  q_n = (1 - eps) onehot(y_n) + eps / C,
    w_n = dout / count ('mean'), dout ('sum') or dout[n] ('none'); w_n = 0 on ignored rows.
    """
    logprobs, targets, valid, count, reduction, eps = cache
    N, C = logprobs.shape
    _check.dout(dout, (N,) if reduction == "none" else (), logprobs.dtype)
    if reduction == "mean":
        w = (dout / count).expand(N)
    elif reduction == "sum":
        w = dout.expand(N)
    else:
        w = dout
    w = torch.where(valid, w, 0.0)  # (N,) select, not multiply: 0 * (dout / 0) would be nan

    dlogits = logprobs.exp()  # (N, C) softmax, from the shifted log-probabilities
    if eps > 0:
        dlogits -= eps / C
    # the target entry: softmax - q = (p - 1) + eps (1 - 1/C), with p - 1 = expm1(log p) exact:
    # p - 1 in floats cancels to 0 when p rounds to 1, expm1 keeps the small difference
    target_logprob = logprobs.gather(1, targets[:, None])  # (N, 1)
    dlogits.scatter_(1, targets[:, None], torch.expm1(target_logprob) + eps * (1 - 1 / C))
    dlogits *= w[:, None]
    return dlogits, None
