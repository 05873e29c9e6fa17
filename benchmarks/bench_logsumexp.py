"""logsumexp: every variant on the same input, one group per shape and mode. torch has no aten
backward op for logsumexp (autograd composes exp and mul), so there is no native variant."""

import pytest
import torch

SHAPES = {"notebook 32x27": ((32, 27), "small"), "large 8192x32768": ((8192, 32768), "large")}


def traffic(x, *, mode, **options):
    """Read x, write dx (the reduced outputs are negligible)."""
    return 2 * x.numel() * x.element_size()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logsumexp(bench, shape):
    dims, size = SHAPES[shape]

    def args():
        return (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),)

    bench("logsumexp", shape, args, {"dim": -1}, size=size, traffic=traffic)
