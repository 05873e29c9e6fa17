"""A fused cross-entropy with backprop's forward/backward contract, and a realistic bug: with
ignored rows, backward's 'mean' divides by all N rows instead of the rows that were kept. The
forward is right, so the loss curve looks fine; only the gradients are too small."""

from typing import NamedTuple

import torch


class Cache(NamedTuple):
    logprobs: torch.Tensor  # (N, C) log softmax, in the compute dtype
    targets: torch.Tensor  # (N,) ignored rows replaced by class 0
    kept: torch.Tensor  # (N,) bool
    reduction: str
    label_smoothing: float
    dtype: torch.dtype


def _check(logits, targets, reduction, ignore_index, label_smoothing):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise TypeError("logits must be a 2-D floating-point tensor (N, C)")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 \
            or targets.shape != logits.shape[:1]:
        raise TypeError(f"targets must be an int64 tensor of shape ({logits.shape[0]},)")
    if logits.device != targets.device:
        raise ValueError("logits and targets must be on one device")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError("label_smoothing must lie in [0, 1]")
    C = logits.shape[1]
    if C == 0:
        raise ValueError("logits need at least one class")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= C))
    if bad.any():
        raise ValueError(f"targets must lie in [0, {C}) or equal ignore_index")


@torch.no_grad()
def forward(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    _check(logits, targets, reduction, ignore_index, label_smoothing)
    # low precisions compute in float32, as torch's own kernels do
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    C = z.shape[1]
    kept = targets != ignore_index
    safe = torch.where(kept, targets, 0)
    logprobs = torch.log_softmax(z, 1)
    loss = -logprobs.gather(1, safe[:, None]).squeeze(1)
    if label_smoothing > 0:  # at 0, skipping it keeps 0 * inf out of masked (-inf) logits
        loss = (1 - label_smoothing) * loss - label_smoothing / C * logprobs.sum(1)
    loss = torch.where(kept, loss, 0.0)
    if reduction == "mean":
        loss = loss.sum() / kept.sum()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype), Cache(logprobs, safe, kept, reduction, label_smoothing, logits.dtype)


@torch.no_grad()
def backward(dout, cache):
    """dlogits[n] = w_n (softmax(z_n) - q_n), q_n = (1 - eps) onehot(y_n) + eps / C,
    w_n = dout / (kept rows) for 'mean', dout for 'sum', dout[n] for 'none'; 0 on ignored rows."""
    logprobs, targets, kept, reduction, eps, dtype = cache
    N, C = logprobs.shape
    w = dout.to(logprobs.dtype).expand(N) if reduction != "none" else dout.to(logprobs.dtype)
    if reduction == "mean":
        w = w / N  # BUG: the mean is over the kept rows, kept.sum(), not over all N
    w = torch.where(kept, w, 0.0)[:, None]
    q = torch.full_like(logprobs, eps / C)
    q.scatter_add_(1, targets[:, None], torch.full_like(logprobs[:, :1], 1 - eps))
    return ((logprobs.exp() - q) * w).to(dtype), None
