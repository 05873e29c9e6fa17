"""linear: manual forward + backward against autograd, same inputs, one group per shape."""

import pytest
import torch

SHAPES = {"notebook 32x30->200": ((32, 30, 200), False), "large 4096x1024->1024": ((4096, 1024, 1024), True)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear(bench, variant, shape):
    (N, D, H), large = SHAPES[shape]
    def args():
        g = torch.Generator().manual_seed(0)
        return (torch.randn(N, D, generator=g), torch.randn(H, D, generator=g), torch.randn(H, generator=g))
    bench("linear", shape, variant, args, large=large)
