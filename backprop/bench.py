"""Benchmarks that can be trusted: paired rounds, their statistics, the run history, and the
driver behind ``backprop bench``.

A claim is a ratio between two contenders timed alternately in one process, on the same inputs:
each round runs every contender once, in a shuffled order, so that whatever else the machine does
lands on all of them alike. A ratio is the median over rounds of (baseline time / contender time)
with a bootstrap 95% confidence interval (2000 resamples, fixed seed). A ratio is flagged, and never
shown as a headline number, when it is absurd (> ABSURD_RATIO either way) or its interval is wider
than WIDE_CI; a contender whose rounds disagree (p80 / p20 > UNSTABLE_SPREAD) is warned about.

Threads: BACKPROP_BENCH_THREADS if set, else 1 for the notebook-scale ("small") shapes, and for
the others torch's own default (the physical cores) on an idle machine, 1 on a busy one (1-minute
load at or above half the cores when the run starts). Fixed for the run, in the report's header.
Why: a notebook-scale call lasts microseconds, a second thread buys nothing there; and on a loaded
machine every parallel region waits for a descheduled thread: torch's cross-entropy backward at
32 x 27 took 16 ms with 2 threads under contention and 25 us with 1, and on this 2-core machine
shared with five other jobs every op at 32 x 200 took 16 ms a call with 2 threads (stable rounds,
a ratio near 1: noise that no spread check sees) against 30-110 us with 1.

Needs numpy (the statistics) and, for the charts, matplotlib: ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import NamedTuple

import torch

DEFAULT_THREADS = torch.get_num_threads()  # read at import, before any benchmark changes it
OURS = ("manual", "manual-compiled")
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


def busy(load_average: float | None = None) -> bool:
    """Other processes want at least half the cores."""
    return (LOAD_AT_IMPORT if load_average is None else load_average) >= cores() / 2


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


def groups(benchmarks: list[dict], memory: list[dict] | None = None) -> dict[tuple, Group]:
    """The groups of a pytest-benchmark run. A paired test (variant 'paired') gives a group's
    rounds; groups without one (the train step) fall back to each variant test's median."""
    peaks = {}
    for b in memory or []:
        i = b["extra_info"]
        peaks[(i["device"], i.get("mode", "step"), i["op"], i["shape"], i["variant"])] = i.get("peak_bytes")
    out: dict[tuple, Group] = {}
    for b in benchmarks:
        info = b["extra_info"]
        key = (info["device"], info.get("mode", "step"), info["op"], info["shape"])
        paired = info.get("paired")
        if paired:
            out[key] = Group(*key, times=paired["times"], paired=True, threads=paired.get("threads"),
                             load=tuple(paired["load"]) if paired.get("load") else None,
                             bytes=info.get("bytes"), flops=info.get("flops"),
                             peak=paired.get("peak_bytes"), sweep=bool(info.get("sweep")),
                             size=info.get("size"))
        elif key not in out or not out[key].paired:
            g = out.setdefault(key, Group(*key, times={}, paired=False, threads=info.get("threads"),
                                          bytes=info.get("bytes"), flops=info.get("flops"), peak={}))
            g.times[info["variant"]] = [b["stats"]["median"]]
            g.peak[info["variant"]] = info.get("peak_bytes")
    for (device, mode, op, shape), g in out.items():
        g.peak = dict(g.peak or {})
        for c in g.times:
            g.peak.setdefault(c, peaks.get((device, mode, op, shape, c)))
            if g.peak[c] is None:
                g.peak[c] = peaks.get((device, mode, op, shape, c))
    return out


def machine(run: dict) -> dict:
    """The run's machine: cpu, cores, torch, gpu, load at start and end, threads policy."""
    m = run.get("machine_info", {})
    extra = m.get("backprop", {})
    return {"cpu": m.get("cpu", {}).get("brand_raw") or m.get("processor") or "?",
            "cores": extra.get("cpus", "?"), "torch": extra.get("torch", "?"), "gpu": extra.get("gpu"),
            "load_start": extra.get("load_start"), "load_end": extra.get("load_end"),
            "threads": extra.get("threads"), "commit": (run.get("commit_info") or {}).get("id")}


def busy_warning(run: dict) -> str | None:
    """A warning when the machine was loaded before or after the run: 1-minute load average (at
    the end, less the run's own threads) at or above half the cores."""
    m = machine(run)
    n = m["cores"] if isinstance(m["cores"], int) else None
    own = max((m["threads"] or {}).values(), default=1)  # the run itself, in the load at its end
    loads = [x for x in (m["load_start"], None if m["load_end"] is None else m["load_end"] - own)
             if x is not None]
    if n and loads and max(loads) >= n / 2:
        return (f"the machine was busy: 1-minute load {m['load_start']:.2f} at the start and "
                f"{m['load_end']:.2f} at the end of the run, on {n} cores; other processes competed "
                "for the cores, so absolute times are inflated and rounds disagree more (the flagged "
                "ratios below are noise)")
    return None


# ---------------------------------------------------------------- history

HISTORY_FIELDS = ["run", "commit", "torch", "cpu", "threads", "load", "device", "op", "shape", "mode",
                  "contender", "p20", "p50", "p80", "baseline", "ratio", "ci_lo", "ci_hi", "flags"]


def git_commit(root: Path | None = None) -> str:
    root = root or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def history_rows(run: dict, commit: str | None = None) -> list[dict]:
    """One row per (group, contender): its p20/p50/p80 and its ratio against autograd (for
    torch's own paths: against our best), with the interval and any flags."""
    m = machine(run)
    rows = []
    for g in groups(run["benchmarks"]).values():
        for c in g.times:
            baseline = "autograd" if c in OURS else g.resolve("best") if c in TORCH else None
            r = g.ratio(c, baseline) if baseline and baseline != c else None
            flags = ([] if r is None or math.isnan(r.lo) else ratio_flags(r)) + g.unstable(c)
            p20, p50, p80 = g.p(c)
            rows.append({
                "run": run.get("datetime", ""), "commit": commit or m["commit"] or git_commit(),
                "torch": m["torch"], "cpu": m["cpu"], "threads": g.threads, "load": m["load_start"],
                "device": g.device, "op": g.op, "shape": g.shape, "mode": g.mode, "contender": c,
                "p20": f"{p20:.6g}", "p50": f"{p50:.6g}", "p80": f"{p80:.6g}", "baseline": baseline or "",
                "ratio": "" if r is None else f"{r.median:.4g}",
                "ci_lo": "" if r is None or math.isnan(r.lo) else f"{r.lo:.4g}",
                "ci_hi": "" if r is None or math.isnan(r.hi) else f"{r.hi:.4g}", "flags": "; ".join(flags)})
    return rows


def append_history(times_json: Path, csv_path: Path, commit: str | None = None) -> int:
    """Append a run's rows to the history CSV (created with a header); a run already there (same
    pytest-benchmark datetime) is not added twice. Returns the number of rows added."""
    run = json.loads(Path(times_json).read_text())
    seen = set()
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            seen = {row["run"] for row in csv.DictReader(f)}
    if run.get("datetime", "") in seen:
        return 0
    rows = history_rows(run, commit)
    new = not csv_path.exists()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def plot_history(csv_path: Path, op: str, png_path: Path, *, device: str = "cpu",
                 contenders: Sequence[str] = OURS) -> Path:
    """One op's ratio against autograd over the runs in the history, a line per (shape, mode,
    contender), the 95% interval shaded, the commits on the x axis in run order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(csv_path).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["op"] == op and r["device"] == device
                and r["contender"] in contenders and r["ratio"]]
    if not rows:
        raise ValueError(f"no {device} rows for op {op!r} in {csv_path}")
    runs = sorted({(r["run"], r["commit"]) for r in rows})
    x_of = {run: i for i, run in enumerate(runs)}
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 3), 4.5))
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["shape"], r["mode"], r["contender"]), []).append(r)
    for (shape, mode, contender), pts in sorted(lines.items()):
        pts.sort(key=lambda r: x_of[(r["run"], r["commit"])])
        xs = [x_of[(r["run"], r["commit"])] for r in pts]
        ax.plot(xs, [float(r["ratio"]) for r in pts], marker="o", label=f"{contender}, {shape}, {mode}")
        if all(r["ci_lo"] for r in pts):
            ax.fill_between(xs, [float(r["ci_lo"]) for r in pts], [float(r["ci_hi"]) for r in pts], alpha=0.15)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [c for _, c in runs], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("autograd time / ours (log); > 1: ours faster")
    ax.set_title(f"{op} on {device}: speedup over autograd by commit (shaded: 95% CI)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------- the backprop bench driver

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `backprop bench` options."""
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for times.json, memory.json, report.md, the charts and history.csv")
    parser.add_argument("--quick", action="store_true",
                        help="notebook-scale shapes, the train step and a short size sweep only")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory pass")
    parser.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select cases")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every case (default: backprop.bench.thread_count's policy)")
    parser.add_argument("--history", metavar="OP", default=None,
                        help="do not run: plot OP's speedup by commit (OUT/history.csv) to OUT/history-OP.png")
    return parser


def main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`backprop bench`: the timing pass, the CPU memory pass, the report, a history row per
    (group, contender) in OUT/history.csv; or, with --history OP, the plot of OP's history."""
    out = Path(getattr(args, "out", Path("bench-results")))
    if getattr(args, "history", None):
        csv_path = out / "history.csv"
        if not csv_path.is_file():
            parser.error(f"--history: no {csv_path}; run backprop bench --out {out} first")
        try:
            png = plot_history(csv_path, args.history, out / f"history-{args.history}.png")
        except ValueError as e:
            parser.error(f"--history: {e}")
        print(f"wrote {png}")
        return 0
    if not (BENCHMARKS / "report.py").is_file():
        parser.error(f"bench runs the benchmarks/ folder of a source checkout, not found at {BENCHMARKS}")
    import importlib.util

    for module in ("pytest", "pytest_benchmark", "matplotlib", "numpy"):
        if importlib.util.find_spec(module) is None:
            parser.error(f"bench needs {module}: pip install -e '.[dev]'")
    out.mkdir(parents=True, exist_ok=True)
    quick, sweep = getattr(args, "quick", False), not getattr(args, "no_sweep", False)
    keywords = (getattr(args, "keyword", None),
                ("notebook or train_step" + (" or sweep" if sweep else "")) if quick else None,
                None if sweep else "not sweep")
    select = " and ".join(f"({k})" for k in keywords if k)
    env = {**os.environ}
    if getattr(args, "threads", None):
        env["BACKPROP_BENCH_THREADS"] = str(args.threads)
    if quick:
        env["BACKPROP_BENCH_QUICK"] = "1"
    pytest = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "-p", "no:cacheprovider",
              "--benchmark-enable", "--benchmark-sort=name", "--benchmark-group-by=group",
              *(["-k", select] if select else [])]
    runs = [("times", {}, ["--benchmark-min-rounds=3", "--benchmark-max-time=0.5"])]
    if not getattr(args, "no_memory", False):
        runs.append(("memory", {"BACKPROP_BENCH": "memory"}, []))
    for name, extra_env, extra in runs:
        print(f"backprop bench: {name} pass", file=sys.stderr, flush=True)
        quiet = subprocess.DEVNULL if name == "memory" else None
        done = subprocess.run([*pytest, f"--benchmark-json={out / (name + '.json')}", *extra],
                              env={**env, **extra_env}, stdout=quiet)
        if done.returncode != 0:
            print(f"backprop bench: the {name} pass failed (pytest exit {done.returncode})", file=sys.stderr)
            return 1
    memory = [] if getattr(args, "no_memory", False) else ["--memory", str(out / "memory.json")]
    return subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), str(out / "times.json"),
                           *memory, "--out", str(out)]).returncode
