"""linear: every variant on the same inputs, one group per shape and mode. Compute-bound (three
matmuls), so no copy comparison but TFLOP/s; torch has no single aten backward op for it (autograd
runs mm)."""

from typing import Any

import pytest
import torch
from torch import Tensor

from backprop.testing.opinfo import OPS

SHAPES = OPS["linear"].benchmark_shapes


def flops(x: Tensor, weight: Tensor, bias: Tensor | None, *, mode: str, **options: Any) -> int:
    """2 N D H a matmul: the forward has one (x @ W.T), the backward two (dx = dout @ W, dW = dout.T @ x)."""
    N, (H, D) = x.numel() // x.shape[-1], weight.shape
    return (3 if mode == "fwd+bwd" else 2) * 2 * N * D * H


def make_args(dims: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    (N, D, H), g = dims, torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(H, D, generator=g), torch.randn(H, generator=g)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear(bench, shape):
    dims, size = SHAPES[shape]
    bench("linear", shape, lambda: make_args(dims), size=size, flops=flops)


def test_linear_sweep(sweep):
    sweep("linear", make_args)
