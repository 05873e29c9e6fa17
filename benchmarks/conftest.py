"""Shared pieces of the benchmark suite: contenders chosen by a string, one group per
(op, shape, dtype, device), inputs built once outside the timed call.

Variants:
  manual    our eager kernels, forward + backward
  autograd  the torch twin (backprop.testing.references) under torch.autograd

Large shapes run only when timing is enabled; the default test run executes every small case
once with --benchmark-disable so that the suite cannot rot.
"""

import pytest
import torch

import backprop
from backprop.testing import REFERENCES, random_dout

VARIANTS = ["manual", "autograd"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(name: str, variant: str, args: tuple, options: dict, device: str):
    """A zero-argument callable running forward + backward once for the chosen variant."""
    op, reference = backprop.OPS[name], REFERENCES[name]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    out, _ = op.forward(*args, **options)
    dout = random_dout(out.shape, out.dtype, out.device, seed=0)
    if variant == "manual":
        def step():
            out, cache = op.forward(*args, **options)
            grads = op.backward(dout, cache)
            _sync(device)
            return grads
    elif variant == "autograd":
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args]
        wrt = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]

        def step():
            out = reference(*leaves, **options)
            grads = torch.autograd.grad(out, wrt, dout)
            _sync(device)
            return grads
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return step


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture
def bench(benchmark, device):
    """bench(name, shape_label, variant, make_args, options): time one case in its own group."""

    def run(name, shape_label, variant, make_args, options=None, large=False):
        if large and benchmark.disabled:
            pytest.skip("large shapes run only when timing (--benchmark-enable)")
        args, options = make_args(), options or {}
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        benchmark.group = f"{name} {shape_label} {str(dtype).removeprefix('torch.')} {device}"
        benchmark.extra_info.update(op=name, shape=shape_label, variant=variant, device=device)
        step = make_step(name, variant, args, options, device)
        step()  # warm-up outside the timing
        return benchmark(step)

    return run
