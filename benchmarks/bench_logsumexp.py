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


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logsumexp(bench, shape):
    dims, size = SHAPES[shape]

    def args():
        return (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),)

    bench("logsumexp", shape, args, {"dim": -1}, size=size, traffic=traffic)
