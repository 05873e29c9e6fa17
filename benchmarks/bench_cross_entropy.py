"""cross_entropy: manual forward + backward against autograd, same inputs, one group per shape."""

import pytest
import torch

SHAPES = {"notebook 32x27": ((32, 27), False), "large 8192x32768": ((8192, 32768), True)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cross_entropy(bench, variant, shape):
    (N, C), large = SHAPES[shape]
    def args():
        g = torch.Generator().manual_seed(0)
        return (torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g))
    bench("cross_entropy", shape, variant, args, large=large)
