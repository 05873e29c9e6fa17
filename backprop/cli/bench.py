"""backprop bench: the benchmarks/ suite under pytest-benchmark (a timing pass, then a CPU
memory pass), then benchmarks/report.py for report.md and the chart."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# the benchmarks/ folder of a source checkout, next to the package
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not (BENCHMARKS / "report.py").is_file():
        parser.error(f"bench runs the benchmarks/ folder of a source checkout, not found at {BENCHMARKS}")
    for module in ("pytest", "pytest_benchmark", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            parser.error(f"bench needs {module}: pip install -e '.[dev]'")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} is a file (expected a directory for the results)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {str(args.out)!r}: cannot create the directory ({e.strerror or e})")
    keywords = (args.keyword, "notebook or train_step" if args.quick else None)
    select = " and ".join(f"({k})" for k in keywords if k)
    pytest = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "-p", "no:cacheprovider",
              "--benchmark-enable", "--benchmark-sort=name", *(["-k", select] if select else [])]
    runs = [("times", {}, ["--benchmark-min-rounds=3", "--benchmark-max-time=0.5"])]
    if not args.no_memory:
        runs.append(("memory", {"BACKPROP_BENCH": "memory"}, []))
    for name, env, extra in runs:
        print(f"backprop bench: {name} pass", file=sys.stderr, flush=True)
        quiet = subprocess.DEVNULL if name == "memory" else None
        done = subprocess.run([*pytest, f"--benchmark-json={args.out / (name + '.json')}", *extra],
                              env={**os.environ, **env}, stdout=quiet)
        if done.returncode != 0:
            print(f"backprop bench: the {name} pass failed (pytest exit {done.returncode})", file=sys.stderr)
            return 1
    memory = [] if args.no_memory else ["--memory", str(args.out / "memory.json")]
    return subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), str(args.out / "times.json"),
                           *memory, "--out", str(args.out)]).returncode
