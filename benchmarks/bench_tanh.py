"""tanh: manual forward + backward against autograd, same inputs, one group per shape."""

import pytest
import torch

SHAPES = {"notebook 32x200": ((32, 200), False), "large 16M": ((4096, 4096), True)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tanh(bench, variant, shape):
    dims, large = SHAPES[shape]
    bench("tanh", shape, variant, lambda: (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),),
          large=large)
