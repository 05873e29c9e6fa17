"""embedding: a gather of table rows, the twin of ``F.embedding``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Cache(NamedTuple):
    indices: torch.Tensor  # (*) int; the table itself is not needed for the gradient
    num_embeddings: int  # V
    embedding_dim: int  # E
    padding_idx: int | None  # in [0, V), already wrapped
    dtype: torch.dtype  # of weight, so that dout can be checked


@_check.no_autograd
def forward(
    indices: torch.Tensor, weight: torch.Tensor, *, padding_idx: int | None = None
) -> tuple[torch.Tensor, Cache]:
    """out[..., :] = weight[indices[...], :]."""
    _check.index("indices", indices)
    _check.floating("weight", weight)
    _check.ndim("weight", weight, 2, "(V, E)")
    _check.same_device(indices=indices, weight=weight)
    V = weight.shape[0]
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
        if not -V <= padding_idx < V:
            raise ValueError(f"padding_idx must lie in [{-V}, {V - 1}] for V={V}, got {padding_idx}")
        padding_idx %= V
    _check.in_range("indices", indices, 0, V)
    # index_select copies (weight[i] with a 0-d i would alias the table); as in F.embedding,
    # the padding row is read like any other
    out = weight.index_select(0, indices.reshape(-1)).reshape(*indices.shape, weight.shape[1])
    return out, Cache(indices, V, weight.shape[1], padding_idx, weight.dtype)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[None, torch.Tensor]:
    """dweight[v] = sum over positions p with indices[p] == v of dout[p]; repeats accumulate.
    dweight[padding_idx] = 0.
    """
    indices, V, E, padding_idx, dtype = cache
    _check.dout(dout, (*indices.shape, E), dtype)
    dweight = dout.new_zeros(V, E)  # (V, E)
    # index_add_, not dweight[indices] = dout: repeated indices must sum, not overwrite
    dweight.index_add_(0, indices.reshape(-1), dout.reshape(indices.numel(), E))
    if padding_idx is not None:
        dweight[padding_idx] = 0
    return None, dweight
