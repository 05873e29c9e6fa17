"""embedding: manual forward + backward against autograd, same inputs, one group per shape."""

import pytest
import torch

SHAPES = {
    "notebook V=27 E=10 32x3": ((27, 10, (32, 3)), False),
    "large V=50257 E=768 8x1024": ((50257, 768, (8, 1024)), True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_embedding(bench, variant, shape):
    (V, E, idx_shape), large = SHAPES[shape]
    def args():
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, V, idx_shape, generator=g), torch.randn(V, E, generator=g))
    bench("embedding", shape, variant, args, large=large)
