"""logsumexp: manual forward + backward against autograd, same inputs, one group per shape."""

import pytest
import torch

SHAPES = {"notebook 32x27": ((32, 27), False), "large 8192x32768": ((8192, 32768), True)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logsumexp(bench, variant, shape):
    dims, large = SHAPES[shape]
    def args():
        return (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),)
    bench("logsumexp", shape, variant, args, {"dim": -1}, large=large)
