"""batch_norm: manual forward + backward against autograd, same inputs, one group per shape."""

import pytest
import torch

SHAPES = {"notebook 32x64": ((32, 64), False), "large 4096x1024": ((4096, 1024), True)}


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batch_norm(bench, variant, correction, shape):
    (N, C), large = SHAPES[shape]
    def args():
        g = torch.Generator().manual_seed(0)
        return (torch.randn(N, C, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g))
    # correction=1: the reference is autograd through the notebook's composed ops (no native op)
    bench("batch_norm", f"{shape} correction={correction}", variant, args,
          {"correction": correction}, large=large)
