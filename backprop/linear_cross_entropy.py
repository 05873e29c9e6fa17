"""linear_cross_entropy: cross_entropy(x @ W.T + b, targets), the twin of ``F.linear_cross_entropy``,
without ever holding the (N, V) logits.

Design (measured in docs/linear_cross_entropy.md): rows in chunks of ``chunk_size``; a chunk's logits
(c, V) are turned into its dlogits and consumed by the two gradient matmuls before the next chunk:

- reduction 'mean' / 'sum' (a scalar loss): forward computes the gradients at dloss = 1 while it
  has each chunk's logits (as Liger-Kernel's FusedLinearCrossEntropy and torch's chunked path
  do), so the logits are computed once; the cache holds dx (N, D), dW (V, D), db (V,), and
  backward only scales them by dout: into new tensors, or, with release=True (the caller never
  reads the cache again: backprop.autograd on a graph it frees), in place, handing them over.
- reduction 'none': dout is a vector known only in backward, so backward recomputes each chunk's
  logits: one extra (c, D) x (D, V) matmul per chunk.

Each chunk: logits into one (c, V) buffer reused by every chunk -> log_softmax in place -> the
loss rows -> dz over the log-probabilities -> dx[chunk] = dz @ W, dW += dz.T @ x[chunk], db +=
dz.sum(0). Memory beyond inputs and outputs: the chunk buffer and O(N D + V D) gradients, never O(N V).
The default chunk, CHUNK_ELEMENTS = 2^23 logits (32 MiB in float32, 256 rows at V = 32768): when the
adapter hands the cached gradients over, the forward's buffer + gradients is the peak (100 MiB at
(2048, 512) -> 32768); the chunk matmuls still run at the full rate (512 rows: no faster, paired).

Class weights (``weight=``) and label smoothing follow F.cross_entropy exactly, including its
weighted mean (divided by the sum of the kept targets' weights) and its smoothing term
sum_c weight[c] (-log p[c]). Only 2-D x (N, D) and class-index targets (N,) are taken.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check

REDUCTIONS = ("mean", "sum", "none")
Grads = tuple[torch.Tensor, torch.Tensor, None, torch.Tensor | None]  # dx, dlinear_weight, None, dlinear_bias
CHUNK_ELEMENTS = 2**23  # the default chunk's logits: at most this many (32 MiB in float32)


class Args(NamedTuple):
    """forward's arguments, checked and prepared: what forward_math reads."""

    x: torch.Tensor  # (N, D)
    linear_weight: torch.Tensor  # (V, D)
    targets: torch.Tensor  # (N,) int64, ignored rows replaced by class 0 (a gatherable index)
    linear_bias: torch.Tensor | None  # (V,)
    weight: torch.Tensor | None  # (V,) class weights
    valid: torch.Tensor | None  # (N,) bool, False on ignored rows; None when no row is ignored
    count: int | torch.Tensor  # number of kept rows: the unweighted 'mean' denominator
    reduction: str
    label_smoothing: float
    chunk_size: int  # rows per chunk


class Cache(NamedTuple):
    x: torch.Tensor  # (N, D) the input itself ('none' recomputes the logits from it)
    linear_weight: torch.Tensor  # (V, D) the input itself
    targets: torch.Tensor  # Args.targets
    linear_bias: torch.Tensor | None  # (V,) the input itself
    weight: torch.Tensor | None  # (V,) the input itself
    valid: torch.Tensor | None  # Args.valid
    count: int | torch.Tensor  # Args.count
    reduction: str
    label_smoothing: float
    chunk_size: int
    # 'mean' / 'sum': the gradients at dloss = 1; None for 'none' (and dbias without a bias)
    dx: torch.Tensor | None  # (N, D)
    dlinear_weight: torch.Tensor | None  # (V, D)
    dlinear_bias: torch.Tensor | None  # (V,)
    versions: tuple[int | None, ...] = ()  # of the VERSIONED tensors at forward; () for a cache built by hand


# the caller's tensors, kept without a copy: backward refuses them edited
VERSIONED = ("x", "linear_weight", "targets", "linear_bias", "weight")


@_check.no_autograd
def forward(
    x: torch.Tensor,
    linear_weight: torch.Tensor,
    targets: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, Cache]:
    """z_n = W x_n + b;  with p = softmax(z_n), w = class weights (1 if None), eps = label_smoothing:
    loss_n = (1 - eps) w[y_n] (-log p[y_n]) + (eps / V) sum_c w[c] (-log p[c])   (0 on ignored rows);
    'mean' divides the sum by sum_n w[y_n] over the kept rows (their count when unweighted; a sum of
    0 with smoothing gives nan, as torch's nll term 0 / 0).
    """
    return forward_math(prepare(x, linear_weight, targets, linear_bias, weight=weight, reduction=reduction,
                                ignore_index=ignore_index, label_smoothing=label_smoothing,
                                chunk_size=chunk_size))


def check(x, linear_weight, targets, linear_bias=None, *, weight=None, reduction="mean", ignore_index=-100,
          label_smoothing=0.0, chunk_size=None) -> Args:
    """Every check that reads no tensor values (dtypes, shapes, devices, options): the Args as if
    no row were ignored. prepare adds the range check and the ignored rows; the custom op
    (backprop.library) adds them on the device, without a sync."""
    _check.floating("x", x)
    _check.floating("linear_weight", linear_weight)
    _check.index("targets", targets, (torch.int64,))
    _check.ndim("x", x, 2, "(N, D)")
    _check.ndim("linear_weight", linear_weight, 2, "(V, D)")
    (N, D), V = x.shape, linear_weight.shape[0]
    if linear_weight.shape[1] != D:
        raise ValueError(f"linear_weight must have D={D} columns to match x (N, D)=({N}, {D}), "
                         f"got shape {tuple(linear_weight.shape)}")
    _check.same_dtype("linear_weight", linear_weight, "x", x)
    _check.shape("targets", targets, (N,), f"(N,) with N={N} rows of x")
    for name, t in (("linear_bias", linear_bias), ("weight", weight)):
        if t is not None:
            _check.floating(name, t)
            _check.shape(name, t, (V,), f"(V,) with V={V} rows of linear_weight")
            _check.same_dtype(name, t, "x", x)
    _check.same_device(x=x, linear_weight=linear_weight, targets=targets, linear_bias=linear_bias,
                       weight=weight)
    reduction = _check.str_option("reduction", reduction, REDUCTIONS)
    # an int, not a bool or a float: ignore_index=True or 1.0 would silently ignore class 1
    _check.int_option("ignore_index", ignore_index)
    label_smoothing = _check.float_option("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if chunk_size is not None and _check.int_option("chunk_size", chunk_size) < 1:  # bool/float/str: TypeError
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk_size = max(1, CHUNK_ELEMENTS // max(V, 1)) if chunk_size is None else int(chunk_size)
    if V == 0:
        raise ValueError(f"linear_weight must have at least one class (V >= 1), got shape "
                         f"{tuple(linear_weight.shape)}")
    return Args(x, linear_weight, targets, linear_bias, weight, None, N, reduction, label_smoothing, chunk_size)


def prepare(x, linear_weight, targets, linear_bias=None, *, weight=None, reduction="mean", ignore_index=-100,
            label_smoothing=0.0, chunk_size=None) -> Args:
    """Validate forward's arguments and prepare forward_math's. The ignored rows are found here,
    because the range check of the targets must skip them (one device sync)."""
    a = check(x, linear_weight, targets, linear_bias, weight=weight, reduction=reduction,
              ignore_index=ignore_index, label_smoothing=label_smoothing, chunk_size=chunk_size)
    V = linear_weight.shape[0]
    if not 0 <= ignore_index < V and _check.all_in_range(targets, 0, V):
        return a  # the common case in one pass: every target a class, so none equals ignore_index
    valid = targets != ignore_index  # (N,)
    count = int(valid.sum())
    # (N,) a gatherable index on ignored rows; valid None when none is ignored
    safe, valid = (torch.where(valid, targets, 0), valid) if count < a.count else (targets, None)
    _check.in_range("targets", safe, 0, V, allowed=f"ignore_index={ignore_index}")
    return a._replace(targets=safe, valid=valid, count=count)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    """forward without the checks: the loss, and for a scalar loss the gradients at dloss = 1."""
    x, W, targets, b, cw, valid, _, reduction, eps, chunk = a
    N = x.shape[0]
    rows = []  # each chunk's loss rows (c,), joined once: no copy into a slice (forward mode refuses it)
    versions = _check.versions(x, W, targets, b, cw)
    if reduction == "none":
        for i, j, logp in _chunks(x, W, b, chunk):
            rows.append(_row_loss(logp, targets[i:j], _rows(valid, i, j), cw, eps))
        return _join(rows, x), Cache(*a, None, None, None, versions)
    denom = _denominator(a)  # g_n = 1 / denom at dloss = 1
    g = _kept(torch.full((N, 1), 1.0, dtype=x.dtype, device=x.device) / denom, _rows(valid, 0, N))  # (N, 1)
    grads = _Grads(x, W, b is not None)  # select, not multiply, above: 1 / 0 is inf with every row ignored
    for i, j, logp in _chunks(x, W, b, chunk):
        rows.append(_row_loss(logp, targets[i:j], _rows(valid, i, j), cw, eps))
        grads.add(_dlogits_(logp, g[i:j], targets[i:j], cw, eps), i, j)  # dz in logp's memory
    logp = None  # the chunk buffer (a view of it outlives the loop) freed before dx's rows are joined
    out = (_join(rows, x).sum() / denom).to(x.dtype)  # nan for 'mean' when every row is ignored, as in torch
    return out, Cache(*a, *grads.result(x.dtype), versions)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache, release: bool = False) -> Grads:
    """With z_n = W x_n + b, p = softmax(z_n), w = class weights (1 if None), eps = label_smoothing:
    dz[n, c] = g_n (a_n p[c] - q_n[c]),  q_n[c] = (1 - eps) w[y_n] [c == y_n] + (eps / V) w[c],
    a_n = sum_c q_n[c];  g_n = dout / sum_kept w[y] ('mean'), dout ('sum'), dout[n] ('none'), 0 if ignored;
    dx = dz @ W,  dW = dz.T @ x,  db = dz.sum(0): summed chunk by chunk, dz never whole.
    release=True: the caller never uses this cache again; a scalar loss's cached gradients are then
    scaled in place and returned (no second copy). Default: the cache is left as it was.
    """
    check_backward(dout, cache)
    return backward_math(dout, cache, release)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "linear_cross_entropy")
    _check.unmodified(cache, VERSIONED)
    rows = (cache.x.shape[0],) if cache.reduction == "none" else ()
    _check.dout(dout, rows, cache.x.dtype, cache.x.device)


def backward_math(dout: torch.Tensor, cache: Cache, release: bool = False) -> Grads:
    x, W, targets, b, cw, valid, _, reduction, eps, chunk, dx1, dW1, db1, _ = cache
    if reduction != "none":
        # the loss is linear in dloss: scale the gradients forward computed at dloss = 1, into new
        # tensors (backward can run again on this cache), or in place when the cache is released
        s, scale = _through(dout, cache), torch.Tensor.mul_ if release else torch.mul
        return scale(dx1, s), scale(dW1, s), None, None if db1 is None else scale(db1, s)
    g = _kept(dout[:, None], _rows(valid, 0, x.shape[0]))  # (N, 1)
    grads = _Grads(x, W, b is not None)
    for i, j, logp in _chunks(x, W, b, chunk):  # the logits again: one more matmul per chunk
        grads.add(_dlogits_(logp, g[i:j], targets[i:j], cw, eps), i, j)
    dx, dW, db = grads.result(x.dtype)
    return dx, dW, None, db


def jvp(tangents: tuple[torch.Tensor | None, ...], cache: Cache) -> torch.Tensor | None:
    """Forward mode. The logits move by t_z = t_x W^T + x t_W^T + t_b, so row n's loss moves by
    <dz1_n, t_z,n> with dz1 = backward's dlogits at g_n = 1 (0 on ignored rows):
        'none':  t_loss_n = sum_c (a_n p_n[c] - q_n[c]) t_z[n, c]
        scalar:  t_loss = <dx1, t_x> + <dW1, t_W> + <db1, t_b>  (the cached gradients at dloss = 1,
                 which hold the 'mean' denominator), no logits recomputed.
    None when every tangent is None."""
    t_x, t_w, _, t_b = (*tangents, None, None, None, None)[:4]
    if t_x is None and t_w is None and t_b is None:
        return None
    x, W, targets, b, cw, valid, _, reduction, eps, chunk, dx1, dW1, db1, _ = cache
    if reduction != "none":
        terms = [(d * t).sum() for d, t in ((dx1, t_x), (dW1, t_w), (db1, t_b)) if t is not None]
        t = sum(terms[1:], terms[0])
        # the cached gradients hold 1 / denom, or 0 if denom = 0 (all ignored): d / d is 1, or torch's 0 / 0
        d = torch.as_tensor(_denominator(cache), device=x.device)
        return t * (d / d).to(t.dtype)
    g = _kept(x.new_ones(x.shape[0], 1), _rows(valid, 0, x.shape[0]))  # (N, 1)
    rows = []  # out of place: under vmap the tangents are batched and the cache is not
    for i, j, logp in _chunks(x, W, b, chunk):
        dz = _dlogits_(logp, g[i:j], targets[i:j], cw, eps)  # (c, V)
        t_z = [t for t in (None if t_x is None else t_x[i:j] @ W.t(), None if t_w is None else
                           x[i:j] @ t_w.t(), t_b) if t is not None]
        rows.append(sum(((dz * t).sum(-1) for t in t_z[1:]), (dz * t_z[0]).sum(-1)))
    return _join(rows, x)


def _chunks(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, chunk: int):
    """Yields (i, j, logp): row ranges [i, j) of at most chunk rows, and the chunk's
    log-probabilities log_softmax(x[i:j] @ W.T + b) (c, V). One buffer, allocated once, holds
    every chunk's logits and then, in place, its log-probabilities: a fresh tensor per chunk is
    page-faulted in again each time (measured: docs/linear_cross_entropy.md). logp is
    overwritten by the next chunk."""
    ranges = _chunk_ranges(x.shape[0], chunk)
    buffer = x.new_empty(max((j - i for i, j in ranges), default=0), W.shape[0])  # (c, V)
    for i, j in ranges:
        z = buffer[: j - i]
        if b is None:
            torch.mm(x[i:j], W.t(), out=z)
        else:
            torch.addmm(b, x[i:j], W.t(), out=z)
        # in place: the row-wise kernel reads a row (max, sum of exp) before it writes it
        yield i, j, torch.log_softmax(z, 1, out=z)


def _chunk_ranges(N: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges [i, j) covering 0..N in chunks of at most chunk rows."""
    return [(i, min(i + chunk, N)) for i in range(0, N, chunk)]


def _join(rows: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The chunks' loss rows (c,) as one (N,) tensor (empty when N = 0)."""
    return torch.cat(rows) if rows else x.new_zeros(0)


def _denominator(a: Args | Cache) -> int | torch.Tensor:
    """'mean': sum_kept w[y] (the kept rows' count unweighted; float32 for 16-bit weights); 'sum': 1.
    With label smoothing a weight sum of 0 is nan: torch divides its nll and smoothing terms by it
    apart, and the nll term's 0 / 0 makes the loss and every gradient nan (the sum over 0 is inf)."""
    if a.reduction == "sum" or a.weight is None:
        return 1 if a.reduction == "sum" else a.count
    total = _kept(a.weight[a.targets], a.valid).sum(dtype=_check.opmath(a.x.dtype))
    return total / (total != 0) if a.label_smoothing > 0 else total  # 0 / 0 = nan; any other total as it is


def _through(dout: torch.Tensor, cache: Cache) -> torch.Tensor:
    """dout; differentiated (double backward), torch's d/ddout of where(kept, dout / denom, 0): nan at 0."""
    if not torch.is_grad_enabled():
        return dout
    d = torch.as_tensor(_denominator(cache), device=dout.device)
    return torch.where(d != 0, dout, torch.where(d != 0, dout / d, 0.0).to(dout.dtype))


def _rows(valid: torch.Tensor | None, i: int, j: int) -> torch.Tensor | None:
    return None if valid is None else valid[i:j, None]  # (c, 1)


def _kept(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return t if valid is None else torch.where(valid, t, 0.0)


def _row_loss(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None, cw: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """loss_n = (1 - eps) w[y] (-log p[y]) + (eps / V) sum_c w[c] (-log p[c]): (c, V) -> (c,)."""
    V = logp.shape[1]
    nll = logp.gather(1, targets[:, None]).neg_()  # (c, 1)
    if cw is not None:
        nll *= cw[targets, None]
    if eps > 0:  # the sum only when smoothing: at eps = 0 a -inf logit would make 0 * inf = nan
        smooth = (logp.sum(1, keepdim=True) if cw is None else logp @ cw[:, None]).neg_()  # (c, 1)
        nll = (1 - eps) * nll + (eps / V) * smooth
    return _kept(nll, valid).squeeze(1)


def _dlogits_(logp: torch.Tensor, g: torch.Tensor, targets: torch.Tensor, cw: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """dz = g (a p - q) for a chunk, written over its log-probabilities logp (c, V); g (c, 1)."""
    V = logp.shape[1]
    total = V if cw is None else cw.sum()  # sum_c w[c]
    wy = 1.0 if cw is None else cw[targets, None]  # (c, 1) w[y_n]
    a = (1 - eps) * wy + (eps / V) * total if eps > 0 else wy  # (c, 1) or 1: a_n = sum_c q_n[c]
    logpy = logp.gather(1, targets[:, None])  # (c, 1), read before exp_
    dz = logp.exp_().mul_(g * a)  # (c, V) g a p
    if eps > 0:
        dz -= (g * (eps / V)) * (cw if cw is not None else 1.0)  # g q, its uniform part
    # the target entry g (a p_y - q_y) without the O(1) cancellation of a p_y - (1 - eps) w_y:
    # (1 - eps) w_y (p_y - 1) + (eps / V) (S p_y - w_y), with p_y - 1 = expm1(log p_y) exact
    target = (1 - eps) * wy * torch.expm1(logpy)  # (c, 1)
    if eps > 0:
        target = target + (eps / V) * (total * logpy.exp() - wy)
    return dz.scatter_(1, targets[:, None], target * g)


class _Grads:
    """dx, dW, db summed chunk by chunk: dx[chunk] = dz @ W;  dW += dz.T @ x;  db += dz.sum(0).
    dW and db accumulate in opmath (float32 for 16-bit inputs: one rounding per chunk, not a
    bfloat16 sum over chunks); the first chunk writes them, so no (V, D) buffer is zero-filled."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor, has_bias: bool) -> None:
        self.x, self.W, self.has_bias = x, W, has_bias
        self.dx: list[torch.Tensor] = []  # each chunk's rows of dx (c, D)
        self.dW: torch.Tensor | None = None  # (V, D)
        self.db: torch.Tensor | None = None  # (V,)
        self.acc = _check.opmath(x.dtype)

    def add(self, dz: torch.Tensor, i: int, j: int) -> None:
        self.dx.append(dz @ self.W)  # (c, D)
        if self.dW is None:
            self.dW = (dz.t() @ self.x[i:j]).to(self.acc)  # (V, D)
        elif self.dW.dtype == dz.dtype:
            self.dW.addmm_(dz.t(), self.x[i:j])  # in place: no second (V, D) buffer
        else:
            self.dW += dz.t() @ self.x[i:j]
        if self.has_bias:
            db = dz.sum(0, dtype=self.acc)  # (V,)
            self.db = db if self.db is None else self.db.add_(db)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.dW is None:  # N = 0: no chunk ran
            V, D = self.W.shape
            self.dW = self.W.new_zeros(V, D)
            self.db = self.W.new_zeros(V) if self.has_bias else None
        dx = torch.cat(self.dx) if self.dx else torch.zeros_like(self.x, memory_format=torch.contiguous_format)
        return dx, _check.cast(self.dW, dtype), _check.cast(self.db, dtype)
