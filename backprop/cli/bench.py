"""backprop bench: the benchmarks/ suite under pytest-benchmark (a timing pass with paired
rounds, then a CPU memory pass), then benchmarks/report.py for report.md, the charts and a row
per (group, contender) in history.csv; or, with --history OP, the plot of OP's history."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# the benchmarks/ folder of a source checkout, next to the package
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `backprop bench` options."""
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for times.json, memory.json, report.md, the charts and history.csv")
    parser.add_argument("--quick", action="store_true",
                        help="notebook-scale shapes, the train step and a short size sweep only")
    parser.add_argument("--full", action="store_true",
                        help="also the xl shapes, the custom-op path above the notebook's scale and each "
                             "notebook-scale contender's own table (the default fits 10 minutes on 2 cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory pass")
    parser.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="pytest -k expression to select cases (default: every case)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every case (default: 1 at the notebook's scale and on a busy "
                             "machine, else torch's default)")
    parser.add_argument("--history", metavar="OP", default=None,
                        help="do not run: plot OP's speedup by commit (OUT/history.csv) to OUT/history-OP.png "
                             "(default: run the benchmarks)")
    return parser


def bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`backprop bench`: the timing pass, the CPU memory pass, the report, a history row per
    (group, contender) in OUT/history.csv; or, with --history OP, the plot of OP's history."""
    out = Path(getattr(args, "out", Path("bench-results")))
    if getattr(args, "history", None):
        csv_path = out / "history.csv"
        if not csv_path.is_file():
            parser.error(f"--history: no {csv_path}; run backprop bench --out {out} first")
        try:
            from backprop.bench import plot_history

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
    from backprop.cli import out_dir

    out_dir(parser, out, "the results")
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
    if getattr(args, "full", False):
        env["BACKPROP_BENCH_FULL"] = "1"
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
