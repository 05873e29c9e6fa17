"""cross_entropy through C++ (cross_entropy.cpp): backprop.cross_entropy's contract, one call a
direction.

The C++ covers 2-D logits (N, C) with int64 class indices (N,): weight, every reduction,
label_smoothing, and an ignore_index that no target equals. Anything else (1-D or K-dim logits,
probability or uint8 targets, an ignored row, a bad argument) runs backprop.cross_entropy.
"""

from __future__ import annotations

from torch import Tensor

from backprop import cpp
from backprop import cross_entropy as eager

Cache = eager.Cache
# the rest of the contract is the eager op's, on the same caches: forward mode (jvp), and what the
# adapter (backprop.autograd) recomputes for a double backward or torch.func
Args, prepare, forward_math, check_backward, backward_math, jvp = (
    eager.Args, eager.prepare, eager.forward_math, eager.check_backward, eager.backward_math, eager.jvp)


def forward(
    logits: Tensor,
    targets: Tensor,
    *,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Cache]:
    run = cpp.op("cross_entropy_forward")
    if (run is not None and type(logits) is Tensor and type(targets) is Tensor
            and (weight is None or type(weight) in cpp.TENSORS) and type(reduction) is str
            and reduction in cpp.REDUCTIONS and type(ignore_index) is int
            and -cpp.INT64 <= ignore_index < cpp.INT64 and type(label_smoothing) is float and cpp.unwrapped()):
        found = run(logits, targets, weight, ignore_index, label_smoothing, cpp.REDUCTIONS[reduction])
        if found:  # else not covered, or an error: the eager kernel decides
            loss, shift, logsum, *weight_sum = found
            n = logits.shape[0]
            total = weight_sum[0] if weight_sum else n  # the 'mean' denominator, as the eager cache's
            versions = (logits._version, targets._version, None if weight is None else weight._version)
            return loss, Cache(logits, shift, logsum, targets, weight, None, n, total, reduction,
                               label_smoothing, versions)
    return eager.forward(logits, targets, weight=weight, reduction=reduction, ignore_index=ignore_index,
                         label_smoothing=label_smoothing)


def backward(dout: Tensor, cache: Cache) -> tuple[Tensor, Tensor | None]:
    run = cpp.op("cross_entropy_backward")
    if (run is not None and type(cache) is Cache and cache.valid is None and type(cache.reduction) is str
            and cache.reduction in cpp.REDUCTIONS
            and cpp.plain(dout, cache.logits, cache.targets, cache.weight)
            and cache.versions == (cache.logits._version, cache.targets._version,
                                   None if cache.weight is None else cache.weight._version)):
        # the cache's checks (type, unedited tensors) above; dout's shape and dtype in the C++
        found = run(dout, cache.logits, cache.shift, cache.logsum, cache.targets, cache.weight,
                    float(cache.total), cache.label_smoothing, cpp.REDUCTIONS[cache.reduction])
        if found:
            return found[0], None
    return eager.backward(dout, cache)


forward.__doc__, backward.__doc__ = eager.forward.__doc__, eager.backward.__doc__
