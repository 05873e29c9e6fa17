"""cross_entropy: every variant on the same logits and targets, one group per shape and mode."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from backprop.testing.opinfo import OPS

SHAPES = OPS["cross_entropy"].benchmark_shapes


def native(
    logits: Tensor, targets: Tensor, *, dout: Tensor, **options: Any
) -> tuple[Callable, Callable] | None:
    """aten's own pair: _log_softmax + nll_loss_forward, nll_loss_backward + _log_softmax_backward_data."""
    if options or logits.ndim != 2:
        return None  # the plain 2-D case only: aten's nll_loss2d / weighted pair is not timed
    aten, mean = torch.ops.aten, 1

    def forward():
        logprobs = aten._log_softmax(logits, 1, False)
        loss, total_weight = aten.nll_loss_forward(logprobs, targets, None, mean, -100)
        return logprobs, total_weight

    def backward(logprobs, total_weight):
        dlogprobs = aten.nll_loss_backward(dout, logprobs, targets, None, mean, -100, total_weight)
        return aten._log_softmax_backward_data(dlogprobs, logprobs, 1, logits.dtype)

    saved = forward()
    return (lambda: backward(*forward())), (lambda: backward(*saved))


def liger(logits: Tensor, targets: Tensor, *, dout: Tensor, **options: Any) -> tuple[Callable, None] | None:
    """Liger-Kernel's LigerCrossEntropyLoss (CUDA), fwd+bwd only. By its design its forward writes the
    gradient over its input, so every call after the first reads the previous call's gradient as
    logits: the same work (Liger's own benchmarks call it so), different values."""
    if options or logits.ndim != 2:
        return None
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss, x = LigerCrossEntropyLoss(), logits.detach().clone().requires_grad_()
    return (lambda: torch.autograd.grad(loss(x, targets), x, dout)), None


def traffic(logits: Tensor, targets: Tensor, *, mode: str, **options: Any) -> int:
    """Both modes must at least read the (N, C) logits (or log-probabilities) once and write dlogits."""
    return 2 * logits.numel() * logits.element_size()


def make_args(dims: tuple) -> tuple[Tensor, Tensor]:
    """dims as in the op table: (logits shape, weighted). Logits (N, C) or (N, C, d1), targets."""
    (shape, _), g = dims, torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g), torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)


def options(dims: tuple) -> dict:
    """Class weights for a weighted shape of the op table."""
    shape, weighted = dims
    if not weighted:
        return {}
    return {"weight": torch.rand(shape[1], generator=torch.Generator().manual_seed(1)) + 0.5}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cross_entropy(bench, shape):
    dims, size = SHAPES[shape]
    bench("cross_entropy", shape, lambda: make_args(dims), options(dims), size=size, native=native,
          traffic=traffic, liger=liger)


def test_cross_entropy_sweep(sweep):
    sweep("cross_entropy", make_args, native=native)
