"""logsumexp: every variant on the same input, one group per shape and mode. torch has no aten
backward op for logsumexp (autograd composes exp and mul), so there is no native variant."""

from typing import Any

import pytest
import torch
from torch import Tensor

from backprop.testing.opinfo import OPS

SHAPES = OPS["logsumexp"].benchmark_shapes


def traffic(x: Tensor, *, mode: str, **options: Any) -> int:
    """Read x, write dx (the reduced outputs are negligible)."""
    return 2 * x.numel() * x.element_size()


def make_args(dims: tuple[int, ...]) -> tuple[Tensor]:
    return (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logsumexp(bench, shape):
    dims, size = SHAPES[shape]
    bench("logsumexp", shape, lambda: make_args(dims), {"dim": -1}, size=size, traffic=traffic)


def test_logsumexp_sweep(sweep):
    sweep("logsumexp", make_args, {"dim": -1})
