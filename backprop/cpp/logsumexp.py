"""logsumexp through C++ (logsumexp.cpp): backprop.logsumexp's contract, one call a direction.

The C++ covers float32 and float64 contiguous CPU x reduced over a set of trailing dims (dim=-1,
the default, or e.g. (-2, -1) in any order; keepdim either way), a 0-d x, empty rows and no rows.
Its loops are written for large shapes too: rows split across torch's threads (at::parallel_for),
each row reduced by one thread in a fixed order (the same bits at any thread count). Anything else
(16-bit dtypes, a strided x, other devices, dims that are not trailing, a bad argument or cache)
runs backprop.logsumexp.
"""

from __future__ import annotations

from torch import Tensor

from backprop import cpp
from backprop import logsumexp as eager

Cache = eager.Cache
VERSIONED = eager.VERSIONED
# its loops are written for large shapes too (threaded over rows, one read of x in the forward, an
# inline vector exp, dx's pages populated in batches): benchmarks/conftest.py times it there as well
# (manual-cpp). Measured at 2048 x 32768 float32, 1 thread, a busy machine: 1.37x compiled
# torch.logsumexp's backward, 1.28x its fwd+bwd
LARGE_SHAPES = True
# the rest of the contract is the eager op's, on the same caches: forward mode (jvp), and what the
# adapter (backprop.autograd) recomputes for a double backward or torch.func
Args, prepare, forward_math, check_backward, backward_math, jvp = (
    eager.Args, eager.prepare, eager.forward_math, eager.check_backward, eager.backward_math, eager.jvp)


def _trailing(dims: tuple, ndim: int) -> int | None:
    """k when dims (non-negative ints) are the trailing dims k, ..., ndim - 1 in any order, else None."""
    k = ndim - len(dims)
    if dims == tuple(range(k, ndim)):
        return k
    if k >= 0 and all(type(d) is int for d in dims) and sorted(dims) == list(range(k, ndim)):
        return k
    return None


def _wrapped(dim: object, ndim: int) -> tuple[int, ...] | None:
    """The eager kernel's dims for dim (ints, non-negative, in dim's order), or None where it would
    raise or the C++ does not cover it (the eager kernel decides)."""
    if ndim == 0:  # a 0-d x accepts dim 0 and -1, and reduces nothing
        return () if type(dim) is int and -1 <= dim <= 0 else None
    if type(dim) is int:
        return (dim + ndim,) if -ndim <= dim < 0 else (dim,) if 0 <= dim < ndim else None
    if type(dim) not in (tuple, list) or not dim or not all(type(d) is int and -ndim <= d < ndim for d in dim):
        return None
    dims = tuple(d + ndim if d < 0 else d for d in dim)
    return dims if len(set(dims)) == len(dims) else None


def forward(x: Tensor, *, dim: int | tuple[int, ...] = -1, keepdim: bool = False) -> tuple[Tensor, Cache]:
    run = cpp.op("logsumexp_forward")
    if run is not None and type(x) in cpp.TENSORS and type(keepdim) is bool and cpp.unwrapped():
        ndim = x.ndim
        dims = (ndim - 1,) if type(dim) is int and dim == -1 and ndim else _wrapped(dim, ndim)
        k = None if dims is None else _trailing(dims, ndim)
        if k is not None:
            found = run(x, k, keepdim)
            if found:  # else not covered: the eager kernel decides
                out, shift, sumexp = found
                return out, Cache(x, shift, sumexp, dims, keepdim, (x._version,))
    return eager.forward(x, dim=dim, keepdim=keepdim)


def backward(dout: Tensor, cache: Cache) -> tuple[Tensor]:
    run = cpp.op("logsumexp_backward")
    if (run is not None and type(cache) is Cache and type(dout) is Tensor and type(cache.x) in cpp.TENSORS
            and type(cache.shift) is Tensor and type(cache.sumexp) is Tensor and type(cache.dims) is tuple
            and type(cache.keepdim) is bool
            and (cache.versions == (cache.x._version,) or cache.versions == ()) and cpp.unwrapped()):
        # the eager check_backward's: x unedited since forward (a cache built by hand has
        # versions=(), nothing to compare); dout's shape and the cache's tensors in the C++
        k = _trailing(cache.dims, cache.x.ndim)
        if k is not None:
            dx = run(dout, cache.x, cache.shift, cache.sumexp, k, cache.keepdim)
            if dx is not None:
                return (dx,)
    return eager.backward(dout, cache)


forward.__doc__, backward.__doc__ = eager.forward.__doc__, eager.backward.__doc__
