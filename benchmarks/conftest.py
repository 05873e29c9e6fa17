"""Shared pieces of the benchmark suite: contenders chosen by a string, one group per
(op, shape, dtype, device, mode), inputs built once outside the timed call.

Variants (the ``variant`` fixture):
  manual             backprop.<op>: our eager kernels
  manual-compiled    backprop.compiled.<op>: the same kernels fused by torch.compile
  autograd           the torch twin (the op table's reference) under torch.autograd; for
                     batch_norm with correction=1, the notebook's composed ops (torch has no op)
  autograd-compiled  torch.compile of that twin, under autograd
  native             the aten forward and backward ops called directly, where torch has them
  copy               src.clone() moving as many bytes (read + write) as the op's minimal traffic:
                     the machine's bandwidth for a function that returns a new tensor, as every
                     contender does (on the CPU a large fresh allocation is page-faulted in by the
                     kernel, a real part of every contender's time), measured in the same run

Modes (the ``mode`` fixture): ``fwd+bwd`` times forward then backward; ``bwd`` times the
backward alone, on a cache (or autograd graph, kept with retain_graph) built outside the timing.

Sizes: "small" (the notebook's scale), "large" (well above the L3 cache) and "gpu" (larger
still, CUDA only). Small cases use pytest-benchmark's calibration; large and gpu cases take
BACKPROP_BENCH_ROUNDS (default 3) timed calls after one warm-up, so that the whole suite stays
under 10 minutes on a 2-core CPU. Large and gpu shapes run only when timing (--benchmark-enable);
the default test run executes every small case once with --benchmark-disable so that the suite
cannot rot. Timing never gates CI.

Peak memory (extra_info["peak_bytes"]): the most bytes one call holds beyond what exists before
it, the returned gradients included. On CUDA, in the timing run: torch.cuda.max_memory_allocated
after reset_peak_memory_stats. On the CPU, in a separate pass (BACKPROP_BENCH=memory, one call
per case, no timing), because the profiler slows every later op of its process by 2x:
torch.profiler with profile_memory=True attributes each allocation to the op that made it
(self_cpu_memory_usage) and records each free as a "[memory]" event; the running sum of those
in time order, and its maximum, is the peak (at op granularity).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

import backprop
from backprop import compiled
from backprop.testing import random_dout
from backprop.testing.opinfo import OPS as TABLE

VARIANTS = ["manual", "manual-compiled", "autograd", "autograd-compiled", "native", "copy"]
MODES = ["fwd+bwd", "bwd"]
ROUNDS_LARGE = int(os.environ.get("BACKPROP_BENCH_ROUNDS", "3"))
_COMPILED_REFERENCES: dict[str, Callable] = {}
# the backward-only mode runs one compiled backward many times on one graph (retain_graph), which
# AOTAutograd's buffer donation forbids; donation is off for the session (autograd-compiled may
# hold a little more memory than it would in a training loop)
torch._functorch.config.donated_buffer = False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _floating(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _kernel_steps(op, args, options, dout):
    out, cache = op.forward(*args, **options)

    def fwd_bwd():
        out, cache = op.forward(*args, **options)
        return op.backward(dout, cache)

    return fwd_bwd, lambda: op.backward(dout, cache)


def _autograd_steps(fn, args, options, dout):
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
              and a.is_floating_point() else a for a in args]
    wrt = _floating(leaves)
    out = fn(*leaves, **options)  # a graph kept for the backward-only mode

    def fwd_bwd():
        return torch.autograd.grad(fn(*leaves, **options), wrt, dout)

    return fwd_bwd, lambda: torch.autograd.grad(out, wrt, dout, retain_graph=True)


def make_inputs(name: str, make_args: Callable, options: dict, device: str) -> tuple[tuple, torch.Tensor]:
    """(args on the device, dout): the same for every variant of a case."""
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in make_args())
    out, _ = backprop.OPS[name].forward(*args, **options)
    return args, random_dout(out.shape, out.dtype, out.device, seed=0)


def make_step(name: str, variant: str, mode: str, args: tuple, dout: torch.Tensor, options: dict,
              device: str, native: Callable | None, traffic: Callable | None) -> Callable:
    """A zero-argument callable running the chosen variant once, synchronised."""
    if variant == "manual":
        steps = _kernel_steps(backprop.OPS[name], args, options, dout)
    elif variant.endswith("compiled") and device == "cpu" and not compiled.cpu_compiler_found():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++)")
    elif variant == "manual-compiled":
        steps = _kernel_steps(compiled.OPS[name], args, options, dout)
    elif variant == "autograd":
        steps = _autograd_steps(TABLE[name].reference, args, options, dout)
    elif variant == "autograd-compiled":
        fn = _COMPILED_REFERENCES.setdefault(name, torch.compile(TABLE[name].reference))
        steps = _autograd_steps(fn, args, options, dout)
    elif variant == "native":
        steps = native(*args, dout=dout, **options) if native else None
        if steps is None:
            pytest.skip(f"torch has no aten backward op for {name} with these options")
    elif variant == "copy":
        if traffic is None:
            pytest.skip(f"{name} is not memory-bound: no bandwidth comparison")
        nbytes = traffic(*args, mode=mode, **options)
        src = torch.empty(nbytes // (2 * dout.element_size()), dtype=dout.dtype, device=device).normal_()
        steps = (src.clone,) * 2  # allocates its output, as every contender does
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    run = steps[MODES.index(mode)]

    def step():
        result = run()
        _sync(device)
        return result

    return step


def peak_bytes(step: Callable, device: str) -> int:
    """Peak bytes allocated during one call of step, above what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = step()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    del result
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage  # + at the allocating op, - at "[memory]" frees
        peak = max(peak, running)
    return peak


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def inputs_cache():
    """Inputs per case, built once per module: a large case's inputs take seconds to draw."""
    cache: dict = {}
    yield cache
    cache.clear()


@pytest.fixture
def bench(benchmark, device, variant, mode, inputs_cache):
    """bench(name, shape_label, make_args, options, large=, native=, traffic=): time one case.

    native(*args, dout=, **options) -> (fwd_bwd, bwd) closures over aten ops, or None;
    traffic(*args, mode=, **options) -> the minimal bytes the mode must move (read + write),
    None when the op is compute-bound."""

    def run(name, shape_label, make_args, options=None, *, size="small", native=None, traffic=None):
        if size != "small" and benchmark.disabled:
            pytest.skip("large shapes run only when timing (--benchmark-enable)")
        if size == "gpu" and device == "cpu":
            pytest.skip("a GPU-only shape")
        options = options or {}
        key = (name, shape_label, device)
        if key not in inputs_cache:
            inputs_cache[key] = make_inputs(name, make_args, options, device)
        args, dout = inputs_cache[key]
        dtype = _floating(args)[0].dtype
        benchmark.group = f"{name} {shape_label} {str(dtype).removeprefix('torch.')} {device} {mode}"
        nbytes = traffic(*args, mode=mode, **options) if traffic else None
        benchmark.extra_info.update(op=name, shape=shape_label, variant=variant, mode=mode,
                                    device=device, bytes=nbytes)
        step = make_step(name, variant, mode, args, dout, options, device, native, traffic)
        step()  # warm-up (and compilation) outside the timing
        if os.environ.get("BACKPROP_BENCH") == "memory":  # the memory pass: one profiled call
            benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
            return benchmark.pedantic(step, rounds=1, iterations=1)
        if size == "small":
            result = benchmark(step)
        else:  # seconds a call on the CPU: three timed calls, no calibration (suite < 10 min)
            result = benchmark.pedantic(step, rounds=ROUNDS_LARGE, iterations=1)
        if device.startswith("cuda") and not benchmark.disabled:  # no profiler: cheap, and exact
            benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
        return result

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the report's machine line needs: torch, threads, cores and the GPU's name."""
    machine_info["backprop"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
