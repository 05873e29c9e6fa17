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
    scale_grad_by_freq: bool = False
    sparse: bool = False


class Cache(NamedTuple):
    indices: torch.Tensor  # (*) int; the table itself is not needed for the gradient
    num_embeddings: int  # V
    embedding_dim: int  # E
    padding_idx: int | None  # in [0, V), already wrapped
    dtype: torch.dtype  # of weight, so that dout can be checked
    deterministic: bool  # backward sums repeats in a fixed order (bitwise reproducible on CUDA)
    versions: tuple[int, ...] = ()  # of indices at forward; () for a cache built by hand
    scale_grad_by_freq: bool = False  # backward divides each row's gradient by its count in indices
    sparse: bool = False  # backward returns dweight as a sparse COO tensor


VERSIONED = ("indices",)  # the caller's tensor, kept without a copy: backward refuses it edited


@_check.no_autograd
def forward(
    indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    deterministic: bool = True,
) -> tuple[torch.Tensor, Cache]:
    """out[..., :] = weight[indices[...], :].

    scale_grad_by_freq and sparse change the gradient only (see backward), as in F.embedding.
    max_norm is refused (ValueError): F.embedding renormalises the looked-up rows of weight in
    place during forward, a side effect on the caller's table that a pure kernel does not have;
    renormalise the table yourself (``torch.renorm``) before the call if you want it.

    deterministic=True (the default) keeps backward bitwise reproducible on CUDA too: repeated
    indices are summed after a sort of the indices. deterministic=False uses index_add_, whose
    CUDA atomics add in whatever order the threads arrive (torch's own embedding backward is not
    repeatable on CUDA either). On the CPU index_add_ is a serial loop and both modes repeat.
    """
    return forward_math(prepare(indices, weight, padding_idx=padding_idx, max_norm=max_norm,
                                norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                                deterministic=deterministic))


def prepare(
    indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
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
    scale_grad_by_freq = _check.bool_option("scale_grad_by_freq", scale_grad_by_freq)
    sparse = _check.bool_option("sparse", sparse)
    _check.float_option("norm_type", norm_type)
    if max_norm is not None:
        _check.float_option("max_norm", max_norm)
        raise ValueError(
            f"max_norm={max_norm!r} is not supported: F.embedding renormalises the looked-up rows of "
            "weight in place during forward, and these kernels never modify their inputs. Renormalise "
            "the table before the call (weight = weight.renorm(2, 0, max_norm)) and pass max_norm=None")
    if sparse and scale_grad_by_freq:  # torch refuses the pair too
        raise ValueError("scale_grad_by_freq=True is not supported with sparse=True (as in F.embedding)")
    _check.in_range("indices", indices, 0, V)
    return Args(indices, weight, padding_idx, deterministic, scale_grad_by_freq, sparse)


def forward_math(a: Args) -> tuple[torch.Tensor, Cache]:
    indices, weight = a.indices, a.weight
    # index_select copies (weight[i] with a 0-d i would alias the table); as in F.embedding,
    # the padding row is read like any other
    out = weight.index_select(0, indices.reshape(-1)).reshape(*indices.shape, weight.shape[1])
    V, E = weight.shape
    return out, Cache(indices, V, E, a.padding_idx, weight.dtype, a.deterministic, _check.versions(indices),
                      a.scale_grad_by_freq, a.sparse)


@_check.no_autograd
def backward(dout: torch.Tensor, cache: Cache) -> tuple[None, torch.Tensor]:
    """dweight[v] = sum over positions p with indices[p] == v of dout[p]; repeats accumulate.
    dweight[padding_idx] = 0.
    scale_grad_by_freq: dweight[v] = sum(...) / count(v), count(v) = #{p : indices[p] == v}
    (torch's rule: not the derivative of forward, which finite differences would give).
    sparse: the same values as a sparse COO tensor, one entry per position p (indices[p], dout[p]),
    padding positions dropped, uncoalesced (as torch's): it equals the dense one once coalesced.
    """
    check_backward(dout, cache)
    return backward_math(dout, cache)


def check_backward(dout: torch.Tensor, cache: Cache) -> None:
    _check.cache(cache, Cache, "embedding")
    _check.unmodified(cache, VERSIONED)
    _check.dout(dout, (*cache.indices.shape, cache.embedding_dim), cache.dtype, cache.indices.device)


def backward_math(dout: torch.Tensor, cache: Cache) -> tuple[None, torch.Tensor]:
    indices, V, E, padding_idx = cache.indices, cache.num_embeddings, cache.embedding_dim, cache.padding_idx
    rows = dout.reshape(indices.numel(), E)  # (P, E) one row per position
    if cache.sparse:
        flat = indices.reshape(-1)  # (P,)
        if padding_idx is not None:  # a host-side filter: the sparse path reads indices anyway
            keep = flat != padding_idx
            flat, rows = flat[keep], rows[keep]
        # values copied: a sparse tensor over dout's own storage would alias the caller's dout
        return None, torch.sparse_coo_tensor(flat[None].long(), rows.clone(), (V, E),
                                             check_invariants=False)  # indices checked by prepare
    if padding_idx is not None:  # the padding row gets no gradient: its positions add zeros (a nan too)
        rows = torch.where((indices.reshape(-1) != padding_idx)[:, None], rows, 0.0)
    dweight = dout.new_zeros(V, E)  # (V, E)
    if cache.deterministic and dweight.is_cuda:
        # on CUDA, index_put_ with accumulate=True sorts the indices and sums each run of repeats
        # in a fixed order (on the CPU it is the parallel one, and index_add_ the serial one)
        dweight.index_put_((indices.reshape(-1),), rows, accumulate=True)
    else:
        # index_add_, not dweight[indices] = dout: repeated indices must sum, not overwrite
        dweight.index_add_(0, indices.reshape(-1), rows)
    if cache.scale_grad_by_freq:
        count = torch.bincount(indices.reshape(-1), minlength=V).clamp_(min=1)  # (V,) 1 for unseen rows
        dweight /= count[:, None].to(dweight.dtype)
    return None, dweight


def jvp(tangents: tuple[None, torch.Tensor | None], cache: Cache) -> torch.Tensor | None:
    """Forward mode: t_out[..., :] = t_W[indices[...], :] (the forward is linear in the table).
    The padding row is read like any other, as in forward: padding_idx, scale_grad_by_freq and
    sparse change only the gradient, not this derivative (as in torch). None when t_W is None."""
    _, t_w = tangents
    if t_w is None:
        return None
    indices, E = cache.indices, cache.embedding_dim
    return t_w.index_select(0, indices.reshape(-1)).reshape(*indices.shape, E)  # (*, E)
