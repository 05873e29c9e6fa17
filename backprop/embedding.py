"""embedding: a gather of table rows, the twin of ``F.embedding``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from backprop import _check


class Args(NamedTuple):
    """forward's arguments, checked and prepared: what forward_math reads."""

    indices: torch.Tensor  # (*) int, every entry in [0, V)
    weight: torch.Tensor  # (V, E)
    padding_idx: int | None  # in [0, V), already wrapped
    deterministic: bool


class Cache(NamedTuple):
    indices: torch.Tensor  # (*) int; the table itself is not needed for the gradient
    num_embeddings: int  # V
    embedding_dim: int  # E
    padding_idx: int | None  # in [0, V), already wrapped
    dtype: torch.dtype  # of weight, so that dout can be checked
    deterministic: bool  # backward sums repeats in a fixed order (bitwise reproducible on CUDA)
    versions: tuple[int, ...] = ()  # of indices at forward; () for a cache built by hand


VERSIONED = ("indices",)  # the caller's tensor, kept without a copy: backward refuses it edited


@_check.no_autograd
def forward(
    indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    padding_idx: int | None = None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, Cache]:
    """out[..., :] = weight[indices[...], :].

    deterministic=True (the default) keeps backward bitwise reproducible on CUDA too: repeated
    indices are summed after a sort of the indices. deterministic=False uses index_add_, whose
    CUDA atomics add in whatever order the threads arrive (torch's own embedding backward is not
    repeatable on CUDA either). On the CPU index_add_ is a serial loop and both modes repeat.
    """
    return forward_math(prepare(indices, weight, padding_idx=padding_idx, deterministic=deterministic))


def prepare(
    indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    padding_idx: int | None = None,
    deterministic: bool = True,
) -> Args:
    """Validate forward's arguments; returns forward_math's (padding_idx wrapped into [0, V))."""
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
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    _check.in_range("indices", indices, 0, V)
    return Args(indices, weight, padding_idx, deterministic)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    indices, weight, padding_idx, deterministic = a
    # index_select copies (weight[i] with a 0-d i would alias the table); as in F.embedding,
    # the padding row is read like any other
    out = weight.index_select(0, indices.reshape(-1)).reshape(*indices.shape, weight.shape[1])
    V, E = weight.shape
    return out, Cache(indices, V, E, padding_idx, weight.dtype, deterministic, _check.versions(indices))


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[None, torch.Tensor]:
    """dweight[v] = sum over positions p with indices[p] == v of dout[p]; repeats accumulate.
    dweight[padding_idx] = 0.
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "embedding")
    _check.unmodified(cache, VERSIONED)
    _check.dout(dout, (*cache.indices.shape, cache.embedding_dim), cache.dtype, cache.indices.device)


def backward_math(dout: torch.Tensor, cache: Cache) -> tuple[None, torch.Tensor]:
    indices, V, E, padding_idx, dtype, deterministic, _ = cache
    dweight = dout.new_zeros(V, E)  # (V, E)
    rows = dout.reshape(indices.numel(), E)  # (P, E) one row per position
    if deterministic and dweight.is_cuda:
        # on CUDA, index_put_ with accumulate=True sorts the indices and sums each run of repeats
        # in a fixed order (on the CPU it is the parallel one, and index_add_ the serial one)
        dweight.index_put_((indices.reshape(-1),), rows, accumulate=True)
    else:
        # index_add_, not dweight[indices] = dout: repeated indices must sum, not overwrite
        dweight.index_add_(0, indices.reshape(-1), rows)
    if padding_idx is not None:
        dweight[padding_idx] = 0
    return None, dweight


def jvp(tangents: tuple[None, torch.Tensor | None], cache: Cache) -> torch.Tensor | None:
    """Forward mode: t_out[..., :] = t_W[indices[...], :] (the forward is linear in the table).
    The padding row is read like any other, as in forward: padding_idx zeroes only the gradient.
    None when t_W is None."""
    _, t_w = tangents
    if t_w is None:
        return None
    indices, E = cache.indices, cache.embedding_dim
    return t_w.index_select(0, indices.reshape(-1)).reshape(*indices.shape, E)  # (*, E)
