"""Benchmarks that can be trusted: paired rounds, their statistics, the run history, and the
driver behind ``backprop bench``.

This module: the thread policy, paired rounds and their statistics.

A claim is a ratio between two contenders timed alternately in one process, on the same inputs:
each round runs every contender once, in a shuffled order, so that whatever else the machine does
lands on all of them alike. A ratio is the median over rounds of (baseline time / contender time)
with a bootstrap 95% confidence interval (2000 resamples, fixed seed). A ratio is flagged, and never
shown as a headline number, when it is absurd (> ABSURD_RATIO either way) or its interval is wider
than WIDE_CI; a contender whose rounds disagree (p80 / p20 > UNSTABLE_SPREAD) is warned about.

Threads: BACKPROP_BENCH_THREADS if set, else 1 for the notebook-scale ("small") shapes, and for
the others torch's own default (the physical cores) on an idle machine, 1 on a busy one: other
processes keep at least half the cores busy when the run starts, sampled from /proc/stat over half
a second (the 1-minute load average where that cannot be read: it lags, a test run that ended 20 s
before still counted 1.1 on 2 cores and cost an idle machine its second thread). Fixed for the
run, in the report's header.
Why: a notebook-scale call lasts microseconds, a second thread buys nothing there; and on a loaded
machine every parallel region waits for a descheduled thread: torch's cross-entropy backward at
32 x 27 took 16 ms with 2 threads under contention and 25 us with 1, and on this 2-core machine
shared with five other jobs every op at 32 x 200 took 16 ms a call with 2 threads (stable rounds,
a ratio near 1: noise that no spread check sees) against 30-110 us with 1.

Needs numpy (the statistics) and, for the charts, matplotlib: ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import NamedTuple

import torch

DEFAULT_THREADS = torch.get_num_threads()  # read at import, before any benchmark changes it
OURS = ("manual", "manual-compiled", "manual-cpp")
TORCH = ("autograd", "autograd-compiled", "native")
UNSTABLE_SPREAD = 1.5  # p80 / p20 of one contender's rounds above this: the rounds disagree
ABSURD_RATIO = 50.0  # a ratio above this (or below its inverse) is not believed
WIDE_CI = 2.0  # an interval whose upper end is more than this times its lower end says little
RESAMPLES = 2000
SEED = 0


# ---------------------------------------------------------------- threads and load


def load() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


LOAD_AT_IMPORT = load()  # the benchmark run's start: the thread policy is decided once, here


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all the machine's CPUs since boot (/proc/stat's first line:
    user nice system idle iowait irq softirq steal); None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 5:
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def busy_cores_now(interval: float = 0.5) -> float | None:
    """How many cores other processes keep busy now: the CPUs' busy share over interval seconds,
    while this process sleeps, times the machine's CPUs; None where /proc/stat cannot be read."""
    before = _cpu_jiffies()
    time.sleep(interval)
    after = _cpu_jiffies()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


@functools.cache
def busy_at_start() -> float | None:
    """busy_cores_now() once, when the run's first benchmark asks: the thread policy's input."""
    return busy_cores_now()


def busy(load_average: float | None = None) -> bool:
    """Other processes want at least half the cores: sampled now (busy_at_start), else by the
    1-minute load average at import; or by the given load average."""
    if load_average is None:
        sampled = busy_at_start()
        load_average = LOAD_AT_IMPORT if sampled is None else sampled
    return load_average >= cores() / 2


def thread_count(size: str) -> int:
    """The torch thread count for a benchmark of this size ("small", "large", "gpu")."""
    if os.environ.get("BACKPROP_BENCH_THREADS"):
        return int(os.environ["BACKPROP_BENCH_THREADS"])
    return 1 if size == "small" or busy() else DEFAULT_THREADS


# ---------------------------------------------------------------- the paired runner


class PairedRunner:
    """Times several zero-argument callables in interleaved rounds.

    warm_up() calls each once (compilation, page faults); calibrate() times one call of each and
    picks how many calls one measurement averages (loops), so that a measurement lasts at least
    min_time; round() runs every contender once, loops calls each, in a shuffled order, and appends
    each one's time per call to times[name]."""

    def __init__(self, steps: dict[str, Callable[[], object]], *, min_time: float = 2e-3, seed: int = SEED):
        self.steps = steps
        self.min_time = min_time
        self.loops = dict.fromkeys(steps, 1)
        self.times: dict[str, list[float]] = {name: [] for name in steps}
        self._rng = random.Random(seed)

    def warm_up(self) -> None:
        for step in self.steps.values():
            step()

    def calibrate(self) -> float:
        """Seconds one round will take. When every contender needs a single call per
        measurement, the calibration calls are a round of data and are kept."""
        single = {}
        order = list(self.steps)
        self._rng.shuffle(order)
        for name in order:
            start = perf_counter()
            self.steps[name]()
            single[name] = perf_counter() - start
        self.loops = {name: max(1, math.ceil(self.min_time / t)) for name, t in single.items()}
        if all(n == 1 for n in self.loops.values()):
            for name, t in single.items():
                self.times[name].append(t)
        return sum(self.loops[name] * t for name, t in single.items())

    def round(self) -> None:
        order = list(self.steps)
        self._rng.shuffle(order)
        for name in order:
            step, loops = self.steps[name], self.loops[name]
            start = perf_counter()
            for _ in range(loops):
                step()
            self.times[name].append((perf_counter() - start) / loops)


def rounds_for(round_seconds: float, budget: float, least: int, most: int) -> int:
    """As many rounds as fit the time budget, at least `least`, at most `most`."""
    return max(least, min(most, math.ceil(budget / max(round_seconds, 1e-9))))


# ---------------------------------------------------------------- statistics


class Ratio(NamedTuple):
    median: float
    lo: float  # bootstrap 95% interval of the median
    hi: float


def percentiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80)."""
    import numpy as np

    p20, p50, p80 = np.percentile(np.asarray(xs, dtype=float), [20, 50, 80])
    return float(p20), float(p50), float(p80)


def bootstrap_median_ci(xs: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the median: the median of `resamples` resamples (with
    replacement, the sample's size), their (1 - level) / 2 and (1 + level) / 2 quantiles."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    medians = np.median(x[idx], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_ratio(baseline: Sequence[float], contender: Sequence[float]) -> Ratio:
    """Median over rounds of baseline / contender (above 1: the contender is faster), with its
    bootstrap interval. Round i of one is paired with round i of the other."""
    ratios = [b / c for b, c in zip(baseline, contender)]
    import numpy as np

    return Ratio(float(np.median(ratios)), *bootstrap_median_ci(ratios))


def ratio_change(old: Sequence[float], new: Sequence[float], *, resamples: int = RESAMPLES,
                 seed: int = SEED) -> Ratio:
    """median(old) / median(new) of two independent samples of per-round ratios, with a bootstrap
    interval that resamples each sample on its own. Above 1: the ratio fell from old to new."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = np.asarray(old, dtype=float), np.asarray(new, dtype=float)
    ma = np.median(a[rng.integers(0, len(a), size=(resamples, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), size=(resamples, len(b)))], axis=1)
    lo, hi = np.quantile(ma / mb, [0.025, 0.975])
    return Ratio(float(np.median(a) / np.median(b)), float(lo), float(hi))


def spread(times: Sequence[float]) -> float:
    """p80 / p20: how far a contender's rounds disagree."""
    p20, _, p80 = percentiles(times)
    return p80 / p20 if p20 > 0 else math.inf


def ratio_flags(r: Ratio) -> list[str]:
    """Why a ratio must not be a headline number (empty: it may be)."""
    flags = []
    if not (1 / ABSURD_RATIO <= r.median <= ABSURD_RATIO):
        flags.append(f"ratio {r.median:.3g}x is beyond {ABSURD_RATIO:g}x")
    if r.lo <= 0 or r.hi / r.lo > WIDE_CI:
        flags.append(f"95% CI {r.lo:.3g}x-{r.hi:.3g}x is wider than {WIDE_CI:g}x")
    return flags


# ---------------------------------------------------------------- reading runs


@dataclass
class Group:
    """One (device, mode, op, shape) group of a run: each contender's per-round times."""

    device: str
    mode: str
    op: str
    shape: str
    times: dict[str, list[float]]  # contender -> seconds per call, one per round (paired: same length)
    paired: bool  # False: medians from separate pytest-benchmark tests, no rounds to pair
    threads: int | None = None
    load: tuple[float, float] | None = None
    bytes: dict[str, int | None] | None = None  # minimal traffic of the mode (for % copy)
    flops: int | None = None
    peak: dict[str, int | None] | None = None
    sweep: bool = False
    size: int | None = None  # the sweep's x: bytes of the inputs
    sweep_top: bool = False  # the large fwd+bwd group, also the top point of its op's size sweep

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.device, self.mode, self.op, self.shape

    def p(self, contender: str) -> tuple[float, float, float]:
        return percentiles(self.times[contender])

    def fastest(self, among: Iterable[str]) -> str | None:
        present = [c for c in among if c in self.times]
        return min(present, key=lambda c: self.p(c)[1]) if present else None

    def resolve(self, contender: str) -> str | None:
        """'best' is our faster path, 'torch' torch's fastest; other names stand for themselves."""
        if contender == "best":
            return self.fastest(OURS)
        if contender == "torch":
            return self.fastest(TORCH)
        return contender if contender in self.times else None

    def ratio(self, contender: str, baseline: str) -> Ratio | None:
        """baseline time / contender time: above 1, the contender is faster."""
        c, b = self.resolve(contender), self.resolve(baseline)
        if c is None or b is None:
            return None
        if self.paired:
            return paired_ratio(self.times[b], self.times[c])
        r = self.p(b)[1] / self.p(c)[1]
        return Ratio(r, math.nan, math.nan)  # no rounds to pair: no interval

    def unstable(self, *contenders: str) -> list[str]:
        """Warnings for the named contenders whose rounds disagree by more than UNSTABLE_SPREAD."""
        out = []
        for c in {self.resolve(c) for c in contenders} - {None}:
            if len(self.times[c]) > 1 and spread(self.times[c]) > UNSTABLE_SPREAD:
                out.append(f"{c} rounds p80/p20 = {spread(self.times[c]):.2f}")
        return sorted(out)


def cpu_peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU during one call of step above what existed before it (what
    step returns counts: it is freed after the profile). torch.profiler with profile_memory=True
    records every allocation (+ bytes) and free (- bytes) with its time: the peak is the running
    sum's maximum in time order. Not each op's self_cpu_memory_usage at the op's start, which
    counts a scope's own frees (an autograd Function's forward, the engine's evaluate_function of a
    node) before its children's allocations: that read 512 MiB for F.linear + F.cross_entropy at
    (2048, 512) -> 32768, whose peak is 768 MiB (docs/linear_cross_entropy.md)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    del result
    records = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]"), key=lambda r: r[0])  # ties keep the recorded order
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def resident_peak_bytes(step: Callable[[], object]) -> int | None:
    """Peak resident bytes one call of step adds (Linux, glibc), without the profiler, so in the
    timing process itself: free heap memory goes back to the system first (malloc_trim), the
    kernel's high-water mark is reset to the present (/proc/self/clear_refs, "5"), and the peak is
    VmHWM after the call less VmRSS before it. Counted in pages that are touched, so only for
    large shapes (MiB and up; a few KiB of allocations may come from pages already resident).
    None where it cannot be read (another OS or libc, or no permission): the profiler measures."""
    import ctypes

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def reset() -> int | None:  # VmRSS after handing free memory back and resetting the mark
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return status("VmRSS")
        except (OSError, StopIteration, AttributeError):
            return None

    before = reset()
    if before is None:
        return None
    result = step()  # outside the try: the step's own errors are the caller's
    peak = status("VmHWM") - before
    del result
    return max(peak, 0)


def resident_peaks_readable() -> bool:
    """Whether resident_peak_bytes measures here: 16 MiB touched and freed before the reset must not
    count (a /proc that accepts clear_refs without resetting the mark would count it)."""
    import torch

    torch.ones(4 << 20).sum()  # 16 MiB resident, then freed
    peak = resident_peak_bytes(lambda: None)
    return peak is not None and peak < 2**20
