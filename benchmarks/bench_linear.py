"""linear: every variant on the same inputs, one group per shape and mode. Compute-bound (three
matmuls), so no copy comparison; torch has no single aten backward op for it (autograd runs mm)."""

import pytest
import torch

from backprop.testing.opinfo import OPS

SHAPES = OPS["linear"].benchmark_shapes


@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear(bench, shape):
    (N, D, H), size = SHAPES[shape]

    def args():
        g = torch.Generator().manual_seed(0)
        return (torch.randn(N, D, generator=g), torch.randn(H, D, generator=g), torch.randn(H, generator=g))

    bench("linear", shape, args, size=size)
