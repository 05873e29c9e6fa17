"""Known bugs in embedding's kernel (see backprop.testing.mutants)."""

from __future__ import annotations

import torch

from backprop import embedding
from backprop.testing.catalogue import mutant


@mutant(embedding)
@torch.no_grad()
def embedding_overwrite_backward(dout, cache):
    """Overwrites instead of accumulating repeated indices: dweight[idx] = dout."""
    indices, V, E, padding_idx = cache.indices, cache.num_embeddings, cache.embedding_dim, cache.padding_idx
    dweight = dout.new_zeros(V, E)
    dweight[indices.reshape(-1)] = dout.reshape(-1, E)
    if cache.scale_grad_by_freq:
        dweight /= torch.bincount(indices.reshape(-1), minlength=V).clamp(min=1)[:, None].to(dout.dtype)
    if padding_idx is not None:
        dweight[padding_idx] = 0
    return None, dweight


@mutant(embedding)
def embedding_padding_not_zeroed_backward(dout, cache):
    """The padding row is not zeroed."""
    _, dweight = embedding.backward(dout, cache._replace(padding_idx=None))
    return None, dweight


def _freq_backward(dout, cache, count):
    _, dweight = embedding.backward(dout, cache._replace(scale_grad_by_freq=False))
    if cache.scale_grad_by_freq:
        dweight = dweight / count(cache.indices.reshape(-1), cache.num_embeddings)[:, None].to(dout.dtype)
    return None, dweight


@mutant(embedding)
def embedding_freq_total_count_backward(dout, cache):
    """scale_grad_by_freq divides by the number of positions, not by each row's own count."""
    return _freq_backward(dout, cache, lambda idx, V: torch.full((V,), max(idx.numel(), 1)))


@mutant(embedding)
def embedding_freq_unclamped_count_backward(dout, cache):
    """scale_grad_by_freq divides by a count of 0 for rows no index names: 0 / 0 = nan there."""
    return _freq_backward(dout, cache, lambda idx, V: torch.bincount(idx, minlength=V))


MUTANTS = [
    embedding_overwrite_backward,
    embedding_padding_not_zeroed_backward,
    embedding_freq_total_count_backward,
    embedding_freq_unclamped_count_backward,
]
