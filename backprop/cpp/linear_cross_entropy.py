"""linear_cross_entropy through C++ (linear_cross_entropy.cpp): backprop.linear_cross_entropy's
contract, one call a direction.

The C++ covers 2-D float32/float64 contiguous CPU x (N, D) and linear_weight (V, D), N >= 1, with
int64 class indices (N,): linear_bias, class weights, every reduction, label_smoothing, chunk_size,
and an ignore_index that no target equals. Its matmuls are ATen's (at::mm / at::addmm, in chunks of
chunk_size rows as the eager kernel's), its row maths loops. Anything else (16-bit dtypes, strided
inputs, an ignored row, a bad argument) runs backprop.linear_cross_entropy.
"""

from __future__ import annotations

from torch import Tensor

from backprop import cpp
from backprop import linear_cross_entropy as eager

Cache, VERSIONED = eager.Cache, eager.VERSIONED
# the rest of the contract is the eager op's, on the same caches: forward mode (jvp), and what the
# adapter (backprop.autograd) recomputes for a double backward or torch.func
Args, prepare, forward_math, check_backward, backward_math, jvp = (
    eager.Args, eager.prepare, eager.forward_math, eager.check_backward, eager.backward_math, eager.jvp)


def forward(
    x: Tensor,
    linear_weight: Tensor,
    targets: Tensor,
    linear_bias: Tensor | None = None,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Cache]:
    run = cpp.op("linear_cross_entropy_forward")
    if (run is not None and type(x) in cpp.TENSORS and type(linear_weight) in cpp.TENSORS
            and type(targets) is Tensor and (linear_bias is None or type(linear_bias) in cpp.TENSORS)
            and (weight is None or type(weight) in cpp.TENSORS) and type(reduction) is str
            and reduction in cpp.REDUCTIONS and type(ignore_index) is int
            and -cpp.INT64 <= ignore_index < cpp.INT64 and type(label_smoothing) is float
            and (chunk_size is None or type(chunk_size) is int and 0 < chunk_size < cpp.INT64)
            and cpp.unwrapped()):
        found = run(x, linear_weight, targets, linear_bias, weight, ignore_index, label_smoothing,
                    cpp.REDUCTIONS[reduction], -1 if chunk_size is None else chunk_size)
        if found:  # else not covered, or an error: the eager kernel decides
            loss, *grads = found  # 'mean' / 'sum': dx, dW (and db) at dloss = 1
            V = linear_weight.shape[0]
            chunk = max(1, eager.CHUNK_ELEMENTS // V) if chunk_size is None else chunk_size  # as eager.check
            versions = (x._version, linear_weight._version, targets._version,
                        None if linear_bias is None else linear_bias._version,
                        None if weight is None else weight._version)
            dx, dW, db = (*grads, None, None, None)[:3]
            return loss, Cache(x, linear_weight, targets, linear_bias, weight, None, x.shape[0], reduction,
                               label_smoothing, chunk, dx, dW, db, versions)
    return eager.forward(x, linear_weight, targets, linear_bias, weight=weight, reduction=reduction,
                         ignore_index=ignore_index, label_smoothing=label_smoothing, chunk_size=chunk_size)


def backward(dout: Tensor, cache: Cache, release: bool = False) -> eager.Grads:
    if (type(cache) is Cache and type(dout) in cpp.TENSORS and type(cache.x) in cpp.TENSORS
            and type(cache.linear_weight) in cpp.TENSORS and type(cache.targets) in cpp.TENSORS
            and all(t is None or type(t) in cpp.TENSORS for t in (cache.linear_bias, cache.weight))
            and cache.versions == (cache.x._version, cache.linear_weight._version, cache.targets._version,
                                   None if cache.linear_bias is None else cache.linear_bias._version,
                                   None if cache.weight is None else cache.weight._version)
            and dout.dtype is cache.x.dtype and dout.is_floating_point() and dout.is_cpu and cache.x.is_cpu
            and cpp.unwrapped()):
        # (no torch.func transform, dispatch mode or tracing: the eager kernel, as every op)
        # the eager check_backward's: the cache's type, its inputs unedited (a cache built by hand,
        # versions=(), goes there), dout's dtype and device; its shape below or in the C++
        if cache.reduction in ("mean", "sum"):
            # the eager backward_math's three muls of the gradients at dloss = 1, without autograd
            # history (the eager kernel runs when anything would record one)
            dx, dW, db = cache.dx, cache.dlinear_weight, cache.dlinear_bias
            if (dout.dim() == 0 and type(dx) is Tensor and type(dW) is Tensor
                    and (db is None or type(db) is Tensor)
                    and not (dout.requires_grad or dx.requires_grad or dW.requires_grad
                             or db is not None and db.requires_grad)):
                scale = Tensor.mul_ if release else Tensor.mul
                return scale(dx, dout), scale(dW, dout), None, None if db is None else scale(db, dout)
        elif (cache.reduction == "none" and cache.valid is None and type(cache.label_smoothing) is float
              and type(cache.chunk_size) is int and 0 < cache.chunk_size < cpp.INT64
              and (run := cpp.op("linear_cross_entropy_backward")) is not None
              and cpp.plain(dout, cache.x, cache.linear_weight, cache.targets, cache.linear_bias,
                            cache.weight)):
            found = run(dout, cache.x, cache.linear_weight, cache.targets, cache.linear_bias, cache.weight,
                        cache.label_smoothing, cache.chunk_size)
            if found:  # else not covered, or an error (dout's shape): the eager kernel decides
                return found[0], found[1], None, found[2] if len(found) == 3 else None
    return eager.backward(dout, cache, release)


forward.__doc__, backward.__doc__ = eager.forward.__doc__, eager.backward.__doc__
