"""batch_norm: every variant on the same input, one group per shape, correction and mode.
correction=1 has no torch op: its autograd reference is the notebook's composed ops."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from backprop.testing.opinfo import OPS

SHAPES = OPS["batch_norm"].benchmark_shapes


def native(x: Tensor, weight: Tensor, bias: Tensor, *, dout: Tensor, eps: float = 1e-5,
           correction: int = 0) -> tuple[Callable, Callable] | None:
    """aten's native_batch_norm and native_batch_norm_backward (training mode, no running stats)."""
    if correction != 0:
        return None
    aten = torch.ops.aten

    def forward():
        _, mean, invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, eps)
        return mean, invstd

    def backward(mean, invstd):
        return aten.native_batch_norm_backward(dout, x, weight, None, None, mean, invstd, True, eps,
                                               [True, True, True])

    saved = forward()
    return (lambda: backward(*forward())), (lambda: backward(*saved))


def traffic(x: Tensor, weight: Tensor, bias: Tensor, *, mode: str, **options: Any) -> int:
    """fwd: read x, write out; bwd: read dout and x (or x-hat), write dx. (C,) vectors negligible."""
    return (5 if mode == "fwd+bwd" else 3) * x.numel() * x.element_size()


def make_args(dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """x of dims (N, C) or (N, C, H, W), weight and bias (C,)."""
    C, g = dims[1], torch.Generator().manual_seed(0)
    return torch.randn(*dims, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batch_norm(bench, correction, shape):
    dims, size = SHAPES[shape]
    bench("batch_norm", f"{shape} correction={correction}", lambda: make_args(dims),
          {"correction": correction}, size=size, native=native, traffic=traffic,
          sweep_top=shape == OPS["batch_norm"].large_shape and correction == 0)


def test_batch_norm_sweep(sweep):
    sweep("batch_norm", make_args, {"correction": 0}, native=native)
