"""linear_cross_entropy: every variant on the same inputs, one group per shape and mode.

"autograd" is the op table's reference, F.linear_cross_entropy's reference path (F.linear then
F.cross_entropy, the (N, V) logits materialised); "native" is torch's chunked path
(F.linear_cross_entropy with LinearCrossEntropyOptions(), its "auto" chunking), under autograd.
Compute-bound (three N x D x V matmuls), so TFLOP/s and no copy comparison."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from torch import Tensor

from backprop import compiled
from backprop.testing.opinfo import OPS

SHAPES = OPS["linear_cross_entropy"].benchmark_shapes


def flops(x: Tensor, linear_weight: Tensor, targets: Tensor, linear_bias: Tensor | None = None, *,
          mode: str, **options: Any) -> int:
    """2 N D V a matmul: the logits x @ W.T, then dx = dz @ W and dW = dz.T @ x (the unfused pair's
    count; our scalar-loss forward does all three and its backward only scales)."""
    (N, D), V = x.shape, linear_weight.shape[0]
    return (3 if mode == "fwd+bwd" else 2) * 2 * N * D * V


def native(
    x: Tensor, linear_weight: Tensor, targets: Tensor, linear_bias: Tensor | None = None, *,
    dout: Tensor, **options: Any
) -> tuple[Callable, Callable] | None:
    """torch's chunked F.linear_cross_entropy, whose forward precomputes the gradients."""
    if options or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    chunked = torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True)  # the bwd mode reruns backward
    x, linear_weight = (t.detach().clone().requires_grad_() for t in (x, linear_weight))

    def forward():
        return F.linear_cross_entropy(x, linear_weight, targets, options=chunked)

    saved = forward()
    return (lambda: torch.autograd.grad(forward(), (x, linear_weight), dout),
            lambda: torch.autograd.grad(saved, (x, linear_weight), dout, retain_graph=True))


def liger(
    x: Tensor, linear_weight: Tensor, targets: Tensor, linear_bias: Tensor | None = None, *,
    dout: Tensor, **options: Any
) -> tuple[Callable, None] | None:
    """Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA), fwd+bwd only: its forward computes the
    gradients chunk by chunk, its backward scales them."""
    if options:
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    x, linear_weight = (t.detach().clone().requires_grad_() for t in (x, linear_weight))
    return (lambda: torch.autograd.grad(loss(linear_weight, x, targets, linear_bias), (x, linear_weight),
                                        dout)), None


@pytest.fixture
def no_compiling_in_the_untimed_run(request, benchmark, monkeypatch):
    """Inductor unrolls the chunk loop: compiling this op takes ~40 s a contender on 2 cores, too
    much for the default (untimed) run, which only proves the benchmark runs. There the compiled
    contenders are skipped (and left out of the paired test); timed runs and the thorough
    hypothesis profile keep them. Returns the reason to skip, or None: the test skips in its body,
    where pytest-benchmark sees the skip (a skip here would leave its fixture "not used at all")."""
    if not benchmark.disabled or settings().max_examples >= 100:
        return None
    if request.node.callspec.params.get("variant", "").endswith("compiled"):
        return "compiling linear_cross_entropy takes ~40 s: timed runs (--benchmark-enable) only"
    monkeypatch.setattr(compiled, "cpu_compiler_found", lambda: False)  # the paired test's contenders
    return None


@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear_cross_entropy(bench, shape, no_compiling_in_the_untimed_run):
    if no_compiling_in_the_untimed_run:
        pytest.skip(no_compiling_in_the_untimed_run)
    (N, D, V), size = SHAPES[shape]

    # the GPU shape is a large-vocabulary LM head (Llama 3's V = 128256) in bfloat16, as trained
    dtype = torch.bfloat16 if size == "gpu" else torch.float32

    def args():
        g = torch.Generator().manual_seed(0)
        # weights of std 1/sqrt(D): logits of order 1, as a trained head's
        return (torch.randn(N, D, generator=g).to(dtype), (torch.randn(V, D, generator=g) / D**0.5).to(dtype),
                torch.randint(0, V, (N,), generator=g), None)

    bench("linear_cross_entropy", shape, args, size=size, native=native, flops=flops, liger=liger)
