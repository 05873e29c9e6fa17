"""embedding through C++ (embedding.cpp): backprop.embedding's contract, one call a direction.

The C++ covers int64 indices of any shape into a float32 or float64 table (V, E): padding_idx,
scale_grad_by_freq and either ``deterministic`` (on the CPU both sum repeats in position order).
Its loops are written for large shapes too: the forward's positions and the backward's columns of
dweight split across torch's threads (at::parallel_for), each column summed over the positions in
order by one thread (the eager kernel's bits at any thread count). Anything else (int32 indices,
sparse=True, max_norm, an out-of-range index or padding_idx, a bad argument) runs
backprop.embedding, which computes it or raises the error.
"""

from __future__ import annotations

from torch import Tensor

from backprop import cpp
from backprop import embedding as eager

Cache = eager.Cache
LARGE_SHAPES = True  # threaded, its large outputs populated before they are written: embedding.cpp
# the rest of the contract is the eager op's, on the same caches: forward mode (jvp), and what the
# adapter (backprop.autograd) recomputes for a double backward or torch.func
Args, prepare, forward_math, check_backward, backward_math, jvp = (
    eager.Args, eager.prepare, eager.forward_math, eager.check_backward, eager.backward_math, eager.jvp)
_INF = float("inf")


def forward(
    indices: Tensor,
    weight: Tensor,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    deterministic: bool = True,
) -> tuple[Tensor, Cache]:
    run = cpp.op("embedding_forward")
    if (run is not None and type(indices) is Tensor and type(weight) in cpp.TENSORS
            and (padding_idx is None or (type(padding_idx) is int and -cpp.INT64 <= padding_idx < cpp.INT64))
            and max_norm is None and type(norm_type) is float and -_INF < norm_type < _INF
            and type(scale_grad_by_freq) is bool and sparse is False and type(deterministic) is bool
            and cpp.unwrapped()):
        found = run(indices, weight, padding_idx)
        if found:  # else not covered, or an error: the eager kernel decides
            V, E = weight.shape
            wrapped = None if padding_idx is None else padding_idx % V  # in [0, V), as the eager cache's
            return found[0], Cache(indices, V, E, wrapped, weight.dtype, deterministic, (indices._version,),
                                   scale_grad_by_freq, False)
    return eager.forward(indices, weight, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                         scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, deterministic=deterministic)


def backward(dout: Tensor, cache: Cache) -> tuple[None, Tensor]:
    run = cpp.op("embedding_backward")
    if (run is not None and type(cache) is Cache and type(dout) is Tensor and type(cache.indices) is Tensor
            and cache.versions == (cache.indices._version,) and dout.dtype is cache.dtype
            and cache.sparse is False and type(cache.num_embeddings) is int and type(cache.embedding_dim) is int
            and (cache.padding_idx is None or type(cache.padding_idx) is int)
            and type(cache.scale_grad_by_freq) is bool and cpp.unwrapped()):
        # the cache's checks (type, unedited indices, dout's dtype) above; dout's shape in the C++
        found = run(dout, cache.indices, cache.num_embeddings, cache.embedding_dim, cache.padding_idx,
                    cache.scale_grad_by_freq)
        if found:
            return None, found[0]
    return eager.backward(dout, cache)


forward.__doc__, backward.__doc__ = eager.forward.__doc__, eager.backward.__doc__
