"""Shared pieces of the benchmark suite: contenders chosen by a string, one group per
(op, shape, dtype, device, mode), inputs built once outside the timed call.

Variants (the ``variant`` fixture):
  manual             backprop.<op>: our eager kernels
  manual-compiled    backprop.compiled.<op>: the same kernels fused by torch.compile
  manual-cpp         backprop.cpp.<op>: the notebook-scale path, one C++ call a direction; for the
                     ops it has, on the CPU, at the small shapes (and at the large ones for an op
                     whose module sets LARGE_SHAPES = True: loops written for them, threaded)
  custom-op          torch.ops.backprop.<op> (backprop.library) under torch.autograd: the custom-op
                     path a user takes (its forward op, then autograd calls <op>_backward), against
                     manual it is the path's cost over calling the kernel directly
  autograd           the torch twin (the op table's reference) under torch.autograd; for
                     batch_norm with correction=1, the notebook's composed ops (torch has no op)
  autograd-compiled  torch.compile of that twin, under autograd
  native             the aten forward and backward ops called directly, where torch has them
  copy               src.clone() moving as many bytes (read + write) as the op's minimal traffic:
                     the machine's bandwidth for a function that returns a new tensor, as every
                     contender does (on the CPU a large fresh allocation is page-faulted in by the
                     kernel, a real part of every contender's time), measured in the same run
  adapter            backprop.autograd.apply(backprop.<op>, ...) under torch.autograd: only for an op
                     whose OpInfo lists it in bench_variants (OPT_IN), where the adapter's path
                     differs from the kernel's (linear_cross_entropy: its last backward hands the
                     cached gradients over); skipped for the others
  liger              Liger-Kernel's Triton module for the op (the bench file's liger=), under
                     torch.autograd: CUDA only, where the liger-kernel package is installed (.ci/gpu
                     installs it from a wheels/ folder carried to the GPU machine); opt-in as adapter

Modes (the ``mode`` fixture): ``fwd+bwd`` times forward then backward; ``bwd`` times the
backward alone, on a cache (or autograd graph, kept with retain_graph) built outside the timing.

Sizes: "small" (the notebook's scale), "large" (well above the L3 cache), "xl" (larger CPU shapes
and option variants of a large one: only with BACKPROP_BENCH_FULL=1) and "gpu" (larger still, CUDA
only). Large, xl and gpu shapes run only when timing (--benchmark-enable); the default test run
executes every small case once with --benchmark-disable so that the suite cannot rot. Timing never
gates CI. The default timing run (backprop bench) fits 10 minutes on two cores; BACKPROP_BENCH_FULL=1
(backprop bench --full) adds the xl shapes, the custom-op contender above the notebook's scale, and
each notebook-scale contender's own pytest-benchmark table beside its paired group.

Paired rounds (the ``paired`` variant; backprop/bench.py has the runner and the statistics): one
test per group builds the inputs once, warms every contender up, then runs rounds in which each
contender is timed once, in a shuffled order (a measurement averages enough calls to last 2 ms).
Rounds: as many as fit BACKPROP_BENCH_BUDGET seconds (default 2) per group, at least
BACKPROP_BENCH_ROUNDS (default 5), at most 50. BACKPROP_BENCH_CONTENDERS (comma-separated, default
every variant) narrows the paired tests to some contenders. Its per-round times go to extra_info["paired"]: the
report's ratios, intervals and flags come from them. The per-variant tests give pytest-benchmark's
own per-variant tables at notebook scale (calibrated rounds; timed with BACKPROP_BENCH_FULL=1); at
the large shapes, where one call takes up to seconds, they are timed only by the paired test (the
memory pass runs each once at every size). Threads: backprop.bench.thread_count.

Size sweep (``sweep`` fixture, fwd+bwd, manual against autograd and native): SWEEP_POINTS shapes
from each op's small to its (first) large benchmark shape, each dimension interpolated
geometrically; only when timing, and with BACKPROP_BENCH_QUICK=1 only the lower half. The top point
is not timed twice: it is the large shape's fwd+bwd paired group (marked sweep_top), whose
contenders include the sweep's.

Peak memory (extra_info["peak_bytes"]): the most bytes one call holds beyond what exists before
it, the returned gradients included. On CUDA, in the timing run: torch.cuda.max_memory_allocated
after reset_peak_memory_stats. On the CPU above the notebook's scale, also in the timing run, on
each contender's warm-up call (a compiled one's: one more call after the rounds, since its warm-up
compiles): the resident peak (free heap memory returned by malloc_trim, the kernel's high-water mark
reset, VmHWM after less VmRSS before; backprop.bench.resident_peak_bytes, Linux and glibc; it agrees
with the profiler's to a page). At
the notebook's scale (KiB, where pages say nothing), and where the resident peak cannot be read, in
a separate pass (BACKPROP_BENCH=memory, one call per case, no timing), because the profiler slows
every later op of its process by 2x: torch.profiler with profile_memory=True records each
allocation and free with its time; the running sum of those in time order, and its maximum, is the
peak (backprop.bench.cpu_peak_bytes).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pytest
import torch

import backprop
import backprop.cpp
import backprop.library
from backprop import bench as stats
from backprop import compiled
from backprop.autograd import apply as adapter_apply
from backprop.testing import random_dout
from backprop.testing.opinfo import OPS as TABLE

VARIANTS = ["manual", "manual-compiled", "manual-cpp", "custom-op", "autograd", "autograd-compiled", "native",
            "copy"]
OPT_IN = ["adapter", "liger"]  # run only for the ops whose OpInfo.bench_variants names them
MODES = ["fwd+bwd", "bwd"]
MIN_ROUNDS = int(os.environ.get("BACKPROP_BENCH_ROUNDS", "5"))
MAX_ROUNDS = 50
BUDGET = float(os.environ.get("BACKPROP_BENCH_BUDGET", "2"))  # seconds of paired rounds per group
SWEEP_POINTS = 5
SWEEP_CONTENDERS = ["manual", "autograd", "native"]  # no compiled paths: a recompile per size
QUICK = os.environ.get("BACKPROP_BENCH_QUICK") == "1"
# BACKPROP_BENCH_FULL=1 (backprop bench --full) adds what the default run leaves out to fit 10 minutes
# on two cores: the "xl" shapes, the custom-op contender above the notebook's scale, and each
# notebook-scale contender's own pytest-benchmark table beside its paired group
FULL = os.environ.get("BACKPROP_BENCH_FULL") == "1"
# the paired tests' contenders: BACKPROP_BENCH_CONTENDERS=manual,custom-op times only those (a run
# about one comparison, at the large shapes where every contender costs seconds a call)
PAIRED = [v for v in os.environ.get("BACKPROP_BENCH_CONTENDERS", ",".join(VARIANTS + OPT_IN)).split(",") if v]
if not set(PAIRED) <= set(VARIANTS + OPT_IN):
    raise ValueError(f"BACKPROP_BENCH_CONTENDERS: {sorted(set(PAIRED) - set(VARIANTS + OPT_IN))} not among "
                     f"{VARIANTS + OPT_IN}")
# the CPU's peak memory above the notebook's scale: the resident peak, in the timing pass (Linux,
# glibc), measured cheaply; else, and always at the notebook's scale, the profiler's memory pass
RESIDENT = stats.resident_peaks_readable()
_COMPILED_REFERENCES: dict[str, Callable] = {}
# torch.ops.backprop.<op> for every op the library registers (backprop.library.TABLE)
CUSTOM_OPS: dict[str, Callable] = {name: getattr(torch.ops.backprop, name) for name in backprop.library.TABLE}
# the backward-only mode runs one compiled backward many times on one graph (retain_graph), which
# AOTAutograd's buffer donation forbids; donation is off for the session (autograd-compiled may
# hold a little more memory than it would in a training loop)
torch._functorch.config.donated_buffer = False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _floating(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _kernel_step(op, args, options, dout, mode):
    if mode == "fwd+bwd":
        def fwd_bwd():  # out stays alive through the backward, as it does under autograd
            out, cache = op.forward(*args, **options)
            return op.backward(dout, cache)

        return fwd_bwd
    _, cache = op.forward(*args, **options)  # built once, outside the timing
    return lambda: op.backward(dout, cache)


def _autograd_step(fn, args, options, dout, mode):
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
              and a.is_floating_point() else a for a in args]
    wrt = _floating(leaves)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(*leaves, **options), wrt, dout)
    out = fn(*leaves, **options)  # a graph kept for the backward-only mode
    return lambda: torch.autograd.grad(out, wrt, dout, retain_graph=True)


def make_inputs(name: str, make_args: Callable, options: dict, device: str) -> tuple[tuple, torch.Tensor]:
    """(args on the device, dout): the same for every variant of a case."""
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in make_args())
    out, _ = backprop.OPS[name].forward(*args, **options)
    return args, random_dout(out.shape, out.dtype, out.device, seed=0)


def make_step(name: str, variant: str, mode: str, args: tuple, dout: torch.Tensor, options: dict,
              device: str, native: Callable | None, traffic: Callable | None,
              liger: Callable | None = None) -> Callable:
    """A zero-argument callable running the chosen variant once, synchronised."""
    if variant == "manual":
        run = _kernel_step(backprop.OPS[name], args, options, dout, mode)
    elif variant.endswith("compiled") and device == "cpu" and not compiled.cpu_compiler_found():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++)")
    elif variant == "manual-compiled":
        run = _kernel_step(compiled.OPS[name], args, options, dout, mode)
    elif variant == "manual-cpp":
        if name not in backprop.cpp.OPS or device != "cpu" or backprop.cpp.kernels() is None:
            pytest.skip(f"backprop.cpp has no {name} on {device} here (the ops: {sorted(backprop.cpp.OPS)}; "
                        "built with g++)")
        run = _kernel_step(backprop.cpp.OPS[name], args, options, dout, mode)
    elif variant == "custom-op":  # forward op, then autograd runs <op>_backward (graph kept in bwd)
        run = _autograd_step(CUSTOM_OPS[name], args, options, dout, mode)
    elif variant == "autograd":
        run = _autograd_step(TABLE[name].reference, args, options, dout, mode)
    elif variant in OPT_IN and variant not in TABLE[name].bench_variants:
        pytest.skip(f"{name}: no {variant} contender (not in its OpInfo.bench_variants)")
    elif variant == "adapter":
        run = _autograd_step(functools.partial(adapter_apply, backprop.OPS[name]), args, options, dout, mode)
    elif variant == "liger":
        run = _liger_step(name, args, dout, options, device, mode, liger)
    elif variant == "autograd-compiled":
        fn = _COMPILED_REFERENCES.setdefault(name, torch.compile(TABLE[name].reference))
        run = _autograd_step(fn, args, options, dout, mode)
    elif variant == "native":
        steps = native(*args, dout=dout, **options) if native else None
        if steps is None:
            pytest.skip(f"torch has no aten backward op for {name} with these options")
        run = steps[MODES.index(mode)]
    elif variant == "copy":
        if traffic is None:
            pytest.skip(f"{name} is not memory-bound: no bandwidth comparison")
        nbytes = traffic(*args, mode=mode, **options)
        src = torch.empty(nbytes // (2 * dout.element_size()), dtype=dout.dtype, device=device).normal_()
        run = src.clone  # allocates its output, as every contender does
    else:
        raise ValueError(f"variant must be one of {VARIANTS + OPT_IN}, got {variant!r}")

    def step():
        result = run()
        _sync(device)
        return result

    return step


def _liger_step(name, args, dout, options, device, mode, liger):
    """Liger-Kernel's contender: liger(*args, dout=, **options) -> (fwd_bwd, bwd or None) or None."""
    if not device.startswith("cuda"):
        pytest.skip("Liger-Kernel's kernels are Triton's: CUDA only")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        pytest.skip(f"liger-kernel is not installed here ({e}); .ci/gpu installs it from wheels/")
    steps = liger(*args, dout=dout, **options) if liger else None
    if steps is None or steps[MODES.index(mode)] is None:
        pytest.skip(f"Liger-Kernel has no {name} contender with these options in mode {mode}")
    return steps[MODES.index(mode)]


def _cpp_at(name: str, size: str) -> bool:
    """Whether backprop.cpp's op is a contender at this size: the notebook's, or any for an op whose
    module says its loops are written for large shapes too (LARGE_SHAPES)."""
    return size == "small" or getattr(backprop.cpp.OPS.get(name), "LARGE_SHAPES", False)


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
    return stats.cpu_peak_bytes(step)  # the profiler's allocation and free records, in time order


@pytest.fixture(params=[*VARIANTS, *OPT_IN, "paired"])
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


@pytest.fixture(autouse=True)
def threads(request):
    """threads(size): set torch's thread count for a case of that size; restored afterwards.
    Every benchmark starts at the notebook scale's count (the train step, which is notebook-scale
    and does not ask, included) and records it."""
    before = torch.get_num_threads()
    torch.set_num_threads(stats.thread_count("small"))
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["threads"] = stats.thread_count("small")
    yield lambda size: torch.set_num_threads(stats.thread_count(size)) or stats.thread_count(size)
    torch.set_num_threads(before)


def run_paired(benchmark, name, mode, args, dout, options, device, contenders, *, native=None,
               traffic=None, memory=False, liger=None):
    """Time the contenders in interleaved rounds (backprop.bench.PairedRunner); the per-round
    times go to extra_info["paired"]. Contenders this case lacks (no native op, no compiler) are
    left out. pytest-benchmark times whole rounds: its row is one round of every contender.
    memory: each contender's peak: on CUDA one more call after the rounds (the allocator's statistics);
    on the CPU the resident peak of its warm-up call (a compiled contender's: one more call after the
    rounds); the CPU's notebook scale is the memory pass's."""
    steps = {}
    for v in contenders:
        try:
            steps[v] = make_step(name, v, mode, args, dout, options, device, native, traffic, liger)
        except pytest.skip.Exception:
            continue
    load_before = stats.load()
    runner = stats.PairedRunner(steps)
    resident = memory and RESIDENT and not device.startswith("cuda") and not benchmark.disabled
    # the CPU's resident peak of a contender that compiles nothing is taken on its warm-up call, the
    # same call as any other (a call seconds long at the large shapes: linear_cross_entropy's group
    # saves four); a compiled contender's warm-up compiles, which inflates the peak: measured after
    peaks = {v: stats.resident_peak_bytes(step) for v, step in steps.items()
             if not v.endswith("compiled")} if resident else {}
    for v, step in steps.items():
        if v not in peaks:
            step()
    if benchmark.disabled:  # the untimed run: one round, to prove the runner works
        return benchmark.pedantic(runner.round)
    rounds = stats.rounds_for(runner.calibrate(), BUDGET, MIN_ROUNDS, MAX_ROUNDS)
    done = len(next(iter(runner.times.values())))  # the calibration round, when it was kept
    result = benchmark.pedantic(runner.round, rounds=max(1, rounds - done), iterations=1)
    if device.startswith("cuda"):
        peaks = {v: peak_bytes(step, device) for v, step in steps.items()}
    elif resident:  # no profiler: it would slow every later op of this process
        peaks = {v: peaks[v] if v in peaks else stats.resident_peak_bytes(step) for v, step in steps.items()}
    else:
        peaks = None
    benchmark.extra_info["paired"] = {"times": runner.times, "loops": runner.loops,
                                      "threads": torch.get_num_threads(),
                                      "load": [load_before, stats.load()], "peak_bytes": peaks}
    return result


@pytest.fixture
def bench(benchmark, device, variant, mode, inputs_cache, threads):
    """bench(name, shape_label, make_args, options, size=, native=, traffic=, flops=, sweep_top=,
    liger=): time one case.

    native(*args, dout=, **options) -> (fwd_bwd, bwd) closures over aten ops, or None; liger(...)
    the same over Liger-Kernel's module (bwd may be None), or None;
    traffic(*args, mode=, **options) -> the minimal bytes the mode must move (read + write),
    None when the op is compute-bound; flops(*args, mode=, **options) -> its floating-point
    operations, for compute-bound ops."""

    def run(name, shape_label, make_args, options=None, *, size="small", native=None, traffic=None,
            flops=None, sweep_top=None, liger=None):
        memory_pass = os.environ.get("BACKPROP_BENCH") == "memory"
        if size != "small" and benchmark.disabled:
            pytest.skip("large shapes run only when timing (--benchmark-enable)")
        if size == "gpu" and device == "cpu":
            pytest.skip("a GPU-only shape")
        if size == "xl" and not FULL:
            pytest.skip("an xl shape: timed by backprop bench --full (BACKPROP_BENCH_FULL=1)")
        if size == "small" and variant != "paired" and not (FULL or memory_pass or benchmark.disabled):
            pytest.skip("timed in its paired group; its own table with backprop bench --full")
        if variant == "paired" and memory_pass:
            pytest.skip("the memory pass measures each variant on its own")
        if size != "small" and variant != "paired" and not memory_pass:
            pytest.skip("timed by this group's paired test (seconds a call: no second timing)")
        if size != "small" and memory_pass and RESIDENT and device == "cpu":
            pytest.skip("above the notebook's scale the timing pass measures the resident peak")
        if size != "small" and variant == "custom-op" and not FULL:
            pytest.skip("the custom-op path above the notebook's scale: backprop bench --full")
        if variant == "manual-cpp" and not _cpp_at(name, size):
            pytest.skip(f"backprop.cpp's {name} is timed at the notebook scale only (its loops)")
        options = options or {}
        key = (name, shape_label, device)
        if key not in inputs_cache:
            inputs_cache[key] = make_inputs(name, make_args, options, device)
        args, dout = inputs_cache[key]
        dtype = _floating(args)[0].dtype
        benchmark.group = f"{name} {shape_label} {str(dtype).removeprefix('torch.')} {device} {mode}"
        nbytes = traffic(*args, mode=mode, **options) if traffic else None
        benchmark.extra_info.update(op=name, shape=shape_label, variant=variant, mode=mode, device=device,
                                    bytes=nbytes, flops=flops(*args, mode=mode, **options) if flops else None,
                                    threads=threads(size))
        if variant == "paired":
            contenders = [v for v in PAIRED if (v != "manual-cpp" or _cpp_at(name, size))
                          and (v != "custom-op" or size == "small" or FULL)]
            # also the top point of its size sweep: the op's first large shape, with the sweep's
            # options (sweep_top=: the bench file says which group that is, when its label differs)
            top = shape_label == TABLE[name].large_shape if sweep_top is None else sweep_top
            if mode == "fwd+bwd" and top:
                benchmark.extra_info.update(sweep_top=True, size=sum(
                    a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))
            return run_paired(benchmark, name, mode, args, dout, options, device, contenders,
                              native=native, traffic=traffic, memory=size != "small", liger=liger)
        step = make_step(name, variant, mode, args, dout, options, device, native, traffic, liger)
        step()  # warm-up (and compilation) outside the timing
        if memory_pass:  # one profiled call
            benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
            return benchmark.pedantic(step, rounds=1, iterations=1)
        result = benchmark(step)
        if device.startswith("cuda") and not benchmark.disabled:  # no profiler: cheap, and exact
            benchmark.extra_info["peak_bytes"] = peak_bytes(step, device)
        return result

    return run


def sweep_dims(small, large, points: int = SWEEP_POINTS) -> list:
    """points shapes from small to large (nested tuples of ints), each int geometrically
    interpolated: small * (large / small) ** (i / (points - 1)), rounded."""

    def at(a, b, t):
        if isinstance(a, tuple):
            return tuple(at(x, y, t) for x, y in zip(a, b))
        if isinstance(a, bool):  # a flag of the shape (cross_entropy's weighted): not a size
            return a
        return max(1, round(a * (b / a) ** t))

    return [at(small, large, i / (points - 1)) for i in range(points)]


def _flat(dims) -> list[int]:
    return [d for x in dims for d in (_flat(x) if isinstance(x, tuple) else [x])]


@pytest.fixture(params=range(SWEEP_POINTS), ids=lambda i: f"sweep{i}")
def sweep(request, benchmark, device, inputs_cache, threads):
    """sweep(name, make_args, options, native=): one point of the op's size sweep, paired rounds
    of manual, autograd and native at fwd+bwd. make_args(dims) builds the inputs for a shape of the
    op table's form. Only when timing (a point above the notebook's scale takes seconds). Every
    point runs with the large shapes' thread count, so that the curve shows the size alone."""

    def run(name, make_args, options=None, *, native=None):
        if benchmark.disabled or os.environ.get("BACKPROP_BENCH") == "memory":
            pytest.skip("the size sweep runs only when timing (--benchmark-enable)")
        point = request.param
        if QUICK and point > (SWEEP_POINTS - 1) // 2:
            pytest.skip("BACKPROP_BENCH_QUICK: the lower half of the sweep only")
        if point == SWEEP_POINTS - 1 and set(SWEEP_CONTENDERS) <= set(PAIRED):  # among that group's
            pytest.skip("the top of the sweep is the op's large shape: its fwd+bwd paired group")
        small = next(dims for dims, size in TABLE[name].benchmark_shapes.values() if size == "small")
        large = TABLE[name].benchmark_shapes[TABLE[name].large_shape][0]
        dims = sweep_dims(small, large)[point]
        options = options or {}
        label = f"sweep{point} " + "x".join(map(str, _flat(dims)))
        args, dout = make_inputs(name, lambda: make_args(dims), options, device)
        benchmark.group = f"{name} {label} {device} fwd+bwd"
        benchmark.extra_info.update(op=name, shape=label, variant="paired", mode="fwd+bwd", device=device,
                                    sweep=True, threads=threads("large"),
                                    size=sum(a.numel() * a.element_size() for a in args
                                             if isinstance(a, torch.Tensor)))
        return run_paired(benchmark, name, "fwd+bwd", args, dout, options, device, SWEEP_CONTENDERS,
                          native=native)

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """What the report's header needs: torch, the thread policy, cores, load before and after, the GPU."""
    machine_info["backprop"] = {
        "torch": torch.__version__,
        "threads": {"small": stats.thread_count("small"), "large": stats.thread_count("large")},
        "cpus": stats.cores(),
        "load_start": stats.LOAD_AT_IMPORT,
        "busy_start": stats.busy_at_start(),  # cores other processes kept busy at the start (or None)
        "load_end": stats.load(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
