"""tanh: every variant on the same input, one group per shape and mode."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from backprop.testing.opinfo import OPS

SHAPES = OPS["tanh"].benchmark_shapes


def native(x: Tensor, *, dout: Tensor) -> tuple[Callable, Callable]:
    """aten.tanh and aten.tanh_backward(dout, out)."""
    out = torch.ops.aten.tanh(x)
    return ((lambda: torch.ops.aten.tanh_backward(dout, torch.ops.aten.tanh(x))),
            (lambda: torch.ops.aten.tanh_backward(dout, out)))


def traffic(x: Tensor, *, mode: str) -> int:
    """fwd: read x, write y; bwd: read y and dout, write dx."""
    return (5 if mode == "fwd+bwd" else 3) * x.numel() * x.element_size()


def make_args(dims: tuple[int, ...]) -> tuple[Tensor]:
    return (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tanh(bench, shape):
    dims, size = SHAPES[shape]
    bench("tanh", shape, lambda: make_args(dims), size=size, native=native, traffic=traffic)


def test_tanh_sweep(sweep):
    sweep("tanh", make_args, native=native)
