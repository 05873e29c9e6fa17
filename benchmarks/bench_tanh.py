"""tanh: every variant on the same input, one group per shape and mode."""

import pytest
import torch

SHAPES = {"notebook 32x200": ((32, 200), "small"), "large 16M": ((4096, 4096), "large"),
          "gpu 256M": ((16384, 16384), "gpu")}


def native(x, *, dout):
    """aten.tanh and aten.tanh_backward(dout, out)."""
    out = torch.ops.aten.tanh(x)
    return ((lambda: torch.ops.aten.tanh_backward(dout, torch.ops.aten.tanh(x))),
            (lambda: torch.ops.aten.tanh_backward(dout, out)))


def traffic(x, *, mode):
    """fwd: read x, write y; bwd: read y and dout, write dx."""
    return (5 if mode == "fwd+bwd" else 3) * x.numel() * x.element_size()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tanh(bench, shape):
    dims, size = SHAPES[shape]
    bench("tanh", shape, lambda: (torch.randn(*dims, generator=torch.Generator().manual_seed(0)),),
          size=size, native=native, traffic=traffic)
