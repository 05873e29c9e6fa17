"""A fused cross-entropy with backprop's forward/backward contract, F.cross_entropy's semantics, and
a realistic bug: backward's 'mean' divides by the target weights of every row, ignored rows
included, instead of the kept rows' only (without class weights: by all N rows instead of the kept
ones). The forward is right, so the loss curve looks fine; only the gradients are too small, and
only in a batch with ignored rows.

    out, cache = forward(logits, targets, weight=None, reduction="mean", ignore_index=-100,
                         label_smoothing=0.0)
    dlogits, dtargets = backward(dout, cache)

logits: (N, C), unbatched (C,), or (N, C, d1, ..., dK): the classes along dim 1 (dim 0 unbatched).
targets: class indices (int64) of logits' shape without the class dim, or class probabilities of
logits' own shape and dtype. A "row" is one position: one loss, before the reduction.
float16 and bfloat16 compute in float32, as torch's own kernels do, and round once.
"""

from typing import NamedTuple

import torch

REDUCTIONS = ("mean", "sum", "none")


class Cache(NamedTuple):
    logprobs: torch.Tensor  # (R, C) log softmax of the R rows, in the compute dtype
    dist: torch.Tensor  # (R, C) t: the weighted, smoothed target distribution; 0 on ignored rows
    # (R,) index targets: w[y_n] (1 without class weights), an ignored row read as class 0;
    # None for class probabilities
    row_weights: torch.Tensor | None
    kept: torch.Tensor  # (R,) bool: False on ignored rows
    weight: torch.Tensor | None  # (C,) class weights in the compute dtype
    shape: torch.Size  # logits' shape
    dtype: torch.dtype  # logits' dtype
    reduction: str
    label_smoothing: float


def _class_dim(logits):
    return 1 if logits.ndim >= 2 else 0


def _rows(t, class_dim):
    """(N, C, d1..dK) -> (N d1..dK, C): the classes last, one row per position; (C,) -> (1, C)."""
    return t.movedim(class_dim, -1).reshape(-1, t.shape[class_dim])


def _unrows(t, shape, class_dim):
    """The inverse of _rows: (R, C) back to logits' shape."""
    moved = [*shape[:class_dim], *shape[class_dim + 1:], shape[class_dim]]
    return t.reshape(moved).movedim(-1, class_dim)


def _check(logits, targets, weight, reduction, ignore_index, label_smoothing):
    """A TypeError (wrong type or dtype) or ValueError (wrong shape, value or option) naming the
    argument; returns whether targets are class probabilities."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim == 0:
        raise ValueError("logits must be (C,), (N, C) or (N, C, d1, ..., dK), got a 0-D tensor")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    class_dim = _class_dim(logits)
    C = logits.shape[class_dim]
    soft = targets.is_floating_point()
    if soft:
        if targets.shape != logits.shape:
            raise ValueError(f"targets: class probabilities must have logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(targets.shape)}")
        if targets.dtype != logits.dtype:
            raise TypeError(f"targets: class probabilities must have logits' dtype {logits.dtype}, "
                            f"got {targets.dtype}")
    else:
        if targets.dtype != torch.int64:
            raise TypeError(f"targets must be int64 class indices or floating-point class probabilities, "
                            f"got {targets.dtype}")
        rows = logits.shape[:class_dim] + logits.shape[class_dim + 1:]
        if targets.shape != rows:
            raise ValueError(f"targets: class indices must have logits' shape without the class dim, "
                             f"{tuple(rows)}, got {tuple(targets.shape)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor or None, got "
                            f"{getattr(weight, 'dtype', type(weight))}")
        if weight.shape != (C,):
            raise ValueError(f"weight must have shape ({C},), one per class, got {tuple(weight.shape)}")
    if len({t.device for t in (logits, targets, weight) if t is not None}) > 1:
        raise ValueError("logits, targets and weight must be on one device")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:  # nan too
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if C == 0:
        raise ValueError(f"logits need at least one class, got shape {tuple(logits.shape)}")
    if soft and ignore_index >= 0:
        raise ValueError(f"ignore_index must be negative with class probabilities, got {ignore_index}")
    if not soft:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= C))
        if bad.any():
            raise ValueError(f"targets must lie in [0, {C}) or equal ignore_index={ignore_index}")
    return soft


@torch.no_grad()
def forward(logits, targets, *, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """loss_n = -sum_c t_nc log softmax(z_n)_c with t the target distribution, weighted and smoothed:
    t_nc = w_c ((1 - eps) q_nc + eps / C), q_n = onehot(y_n) or the given probabilities, w the class
    weights (ones by default), eps = label_smoothing. Ignored rows (y_n == ignore_index) lose 0.
    'mean' divides by the kept rows' target weights, sum_n w[y_n] (their count without weights);
    for class probabilities by the number of rows. The terms are summed as F.cross_entropy sums
    them, so that infinities and NaNs come out as torch's."""
    soft = _check(logits, targets, weight, reduction, ignore_index, label_smoothing)
    eps = float(label_smoothing)
    # low precisions compute in float32, as torch's own kernels do
    compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    class_dim = _class_dim(logits)
    rows_shape = logits.shape[:class_dim] + logits.shape[class_dim + 1:]
    z = _rows(logits.to(compute), class_dim)  # (R, C)
    R, C = z.shape
    w = weight.to(compute) if weight is not None else None
    logprobs = torch.log_softmax(z, 1)

    if soft:
        q = _rows(targets.to(compute), class_dim)
        dist = (1 - eps) * q + eps / C if eps > 0 else q
        if w is not None:
            dist = dist * w
        loss = -(logprobs * dist).sum(1)  # (R,)
        kept = torch.ones(R, dtype=torch.bool, device=z.device)
        row_weights = None
        total = R  # torch's 'mean' with class probabilities: over the rows, whatever the weights
    else:
        y = targets.reshape(-1)  # (R,)
        kept = y != ignore_index
        safe = torch.where(kept, y, 0)  # a class to gather on ignored rows
        row_weights = w[safe] if w is not None else torch.ones(R, dtype=compute, device=z.device)
        # the negative log-likelihood of the target class, then the smoothing term, as torch adds them
        nll = torch.where(kept, -row_weights * logprobs.gather(1, safe[:, None]).squeeze(1), 0.0)
        smooth = None
        if eps > 0:  # at 0, skipping it keeps 0 * inf out of rows with a -inf logit
            smooth = -(logprobs * w).sum(1) if w is not None else -logprobs.sum(1)
            smooth = torch.where(kept, smooth, 0.0)
        total = torch.where(kept, row_weights, 0.0).sum()  # the kept rows' target weights
        onehot = torch.zeros_like(z).scatter_(1, safe[:, None], 1.0)
        dist = (1 - eps) * onehot + eps / C
        if w is not None:
            dist = dist * w
        dist = torch.where(kept[:, None], dist, 0.0)

    if soft:
        out = loss.sum() / total if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    else:
        if reduction == "mean":
            out = nll.sum() / total
            if smooth is not None:
                out = (1 - eps) * out + eps / C * (smooth.sum() / total)
        elif reduction == "sum":
            out = nll.sum()
            if smooth is not None:
                out = (1 - eps) * out + eps / C * smooth.sum()
        else:
            out = nll if smooth is None else (1 - eps) * nll + eps / C * smooth
    if reduction == "none":
        out = out.reshape(rows_shape)
    cache = Cache(logprobs, dist, row_weights, kept, w, logits.shape, logits.dtype, reduction, eps)
    return out.to(logits.dtype), cache


@torch.no_grad()
def backward(dout, cache):
    """With g_n = dout / total ('mean'), dout ('sum') or dout[n] ('none'), 0 on ignored rows, and
    S_n = sum_c t_nc (1 without weights or smoothing):
        dlogits[n, c] = g_n (softmax(z_n)_c S_n - t_nc)
        dtargets[n, c] = -g_n (1 - eps) w_c log softmax(z_n)_c   (class probabilities; else None)"""
    logprobs, dist, row_weights, kept, w, shape, dtype, reduction, eps = cache
    R, C = logprobs.shape
    class_dim = 1 if len(shape) >= 2 else 0
    g = dout.to(logprobs.dtype)
    g = g.reshape(R) if reduction == "none" else g.expand(R)
    if reduction == "mean":
        if row_weights is None:
            g = g / R  # class probabilities: the mean over the rows
        else:
            # BUG: the mean's total is the kept rows' target weights, sum_n kept_n w[y_n]; this sums
            # row_weights over every row, ignored rows too (read as class 0). Without class weights
            # that is N instead of the number of kept rows
            g = g / row_weights.sum()
    # select, not multiply: with every row ignored, dout / 0 is inf and inf * 0 is nan
    g = torch.where(kept, g, 0.0)[:, None]  # (R, 1)
    S = dist.sum(1, keepdim=True)  # (R, 1)
    dlogits = g * (logprobs.exp() * S - dist)
    dlogits = _unrows(dlogits, shape, class_dim).to(dtype)
    if row_weights is not None:
        return dlogits, None  # class indices: no gradient
    dtargets = -(1 - eps) * g * logprobs
    if w is not None:
        dtargets = dtargets * w
    return dlogits, _unrows(dtargets, shape, class_dim).to(dtype)
