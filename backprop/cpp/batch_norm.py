"""batch_norm through C++ (batch_norm.cpp): backprop.batch_norm's contract, one call a direction.

The C++ covers float32 and float64 contiguous CPU x of shape (N, C) or (N, C, *) with values:
weight, bias, training with or without running statistics (the updated ones come back on the
cache, the caller's are not written), eval, any correction, momentum (or None) and eps. Anything
else (16-bit dtypes, channels_last or other strides, other devices, empty x, one value per channel
where the eager kernel refuses it, a bad argument) runs backprop.batch_norm.
"""

from __future__ import annotations

from torch import Tensor

from backprop import batch_norm as eager
from backprop import cpp

Cache = eager.Cache
# its loops are written for large shapes too (threaded over channels or row blocks, vectorised, one
# read of x for the statistics): benchmarks/conftest.py times it there as well (manual-cpp). Measured
# (docs/benchmarks.md, docs/benchmarks-log.md): ahead of torch's fastest in the backward at 4096x1024
# and NCHW 32x64x56x56; the forward writes out alone (x-hat is recomputed in the backward, as aten's
# kernel does)
LARGE_SHAPES = True
# the rest of the contract is the eager op's, on the same caches: forward mode (jvp), and what the
# adapter (backprop.autograd) recomputes for a double backward or torch.func
Args, prepare, forward_math, check_backward, backward_math, jvp = (
    eager.Args, eager.prepare, eager.forward_math, eager.check_backward, eager.backward_math, eager.jvp)
RunningStats, updated_stats = eager.RunningStats, eager.updated_stats


def forward(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    correction: int = 0,
    num_batches_tracked: int = 0,
) -> tuple[Tensor, Cache]:
    run = cpp.op("batch_norm_forward")
    if (run is not None and type(x) is Tensor and (weight is None or type(weight) in cpp.TENSORS)
            and (bias is None or type(bias) in cpp.TENSORS)
            and (running_mean is None or type(running_mean) is Tensor)
            and (running_var is None or type(running_var) is Tensor) and type(training) is bool
            and (momentum is None or type(momentum) is float) and type(eps) is float
            and type(correction) is int and 0 <= correction < cpp.INT64
            and type(num_batches_tracked) is int and 0 <= num_batches_tracked < cpp.INT64 and cpp.unwrapped()):
        found = run(x, weight, bias, running_mean, running_var, training, momentum, eps, correction,
                    num_batches_tracked)
        if found:  # else not covered, or an error: the eager kernel decides
            out, mean, rest, rstd, *updated = found  # updated: training with running statistics, the new ones
            if updated:
                updated.append(num_batches_tracked + 1)
            return out, Cache(x, mean, rest if training else None, rstd, weight, bias is not None, correction,
                              x.dtype, (x._version, None if weight is None else weight._version), training,
                              *updated)
    return eager.forward(x, weight, bias, running_mean=running_mean, running_var=running_var,
                         training=training, momentum=momentum, eps=eps, correction=correction,
                         num_batches_tracked=num_batches_tracked)


def backward(dout: Tensor, cache: Cache) -> tuple[Tensor, Tensor | None, Tensor | None]:
    run = cpp.op("batch_norm_backward")
    if (run is not None and type(cache) is Cache and type(dout) is Tensor and type(cache.x) is Tensor
            and type(cache.mean) is Tensor and (cache.mean_rest is None or type(cache.mean_rest) is Tensor)
            and type(cache.rstd) is Tensor and dout.dtype is cache.dtype
            and type(cache.has_bias) is bool and type(cache.training) is bool
            and type(cache.correction) is int and 0 <= cache.correction < cpp.INT64):
        weight = cache.weight
        # the eager check_backward's: x and the weight unedited since forward (a cache built by hand,
        # versions=(), goes there); dout's shape and the cache's tensors in the C++
        if (cache.versions == (cache.x._version, None if weight is None else weight._version)
                and (weight is None or type(weight) in cpp.TENSORS) and cpp.unwrapped()):
            found = run(dout, cache.x, cache.mean, cache.mean_rest, cache.rstd, weight, cache.has_bias,
                        cache.correction, cache.training)
            if found:
                return found[0], found[1], found[2]
    return eager.backward(dout, cache)


forward.__doc__, backward.__doc__ = eager.forward.__doc__, eager.backward.__doc__
