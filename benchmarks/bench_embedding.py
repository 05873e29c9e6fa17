"""embedding: every variant on the same indices and table, one group per shape and mode."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from backprop.testing.opinfo import OPS

SHAPES = OPS["embedding"].benchmark_shapes


def native(
    indices: Tensor, weight: Tensor, *, dout: Tensor, **options: Any
) -> tuple[Callable, Callable] | None:
    """aten.embedding and aten.embedding_dense_backward."""
    if options:
        return None
    aten, V = torch.ops.aten, weight.shape[0]

    def backward():
        return aten.embedding_dense_backward(dout, indices, V, -1, False)

    return (lambda: (aten.embedding(weight, indices), backward())), backward


def traffic(indices: Tensor, weight: Tensor, *, mode: str, **options: Any) -> int:
    """bwd: read dout (P, E), write dweight (V, E); fwd adds reading P rows and writing out."""
    P, (V, E) = indices.numel(), weight.shape
    return ((3 * P + V) if mode == "fwd+bwd" else (P + V)) * E * weight.element_size()


def make_args(dims: tuple[int, int, tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    (V, E, idx_shape), g = dims, torch.Generator().manual_seed(0)
    return torch.randint(0, V, idx_shape, generator=g), torch.randn(V, E, generator=g)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_embedding(bench, shape):
    dims, size = SHAPES[shape]
    bench("embedding", shape, lambda: make_args(dims), size=size, native=native, traffic=traffic)


def test_embedding_sweep(sweep):
    sweep("embedding", make_args, native=native)
