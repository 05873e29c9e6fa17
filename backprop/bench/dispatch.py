"""Count what one call costs at the notebook scale: the aten ops it dispatches and its host syncs.

    python -m backprop.bench.dispatch            # one markdown row per op: ours fwd / bwd, torch's
    python -m backprop.bench.dispatch --names    # also every op's aten calls, in order
    python -m backprop.bench.dispatch --time     # also microseconds a call: ours, ours without the
                                                 #   checks, autograd, native (1 thread, interleaved)

At the notebook scale (batch 32, vocab 27, hidden 64/200) a kernel's arithmetic takes nanoseconds;
a call costs its Python and one dispatch per aten op (a few microseconds each on this CPU), and on
a GPU every host sync (a value read back to decide something on the host) stalls the stream. This
tool counts both, for one forward and one backward of each op on the inputs of its notebook-scale
benchmark (benchmarks/bench_<op>.py: make_args and the op table's small shape), for ours
(backprop.<op>), for torch's autograd path (the op table's reference, forward and
torch.autograd.grad) and for aten's native pair where the benchmark has one.

What counts: every call that reaches a TorchDispatchMode, i.e. the aten ops below autograd,
views included (they are dispatches too), composite ops as what they decompose into. A host
sync is one of SYNC_OPS: an op whose result is read on the host (``_local_scalar_dense``: .item(),
int(t), bool(t)) or whose output size depends on the data (nonzero, masked_select, unique).
The compiled path is not counted: its graph runs as one call behind Dynamo's guards.

tests/test_bench_dispatch.py pins an upper bound per op (``over_bounds``): a change that adds a
dispatch or a sync to a kernel fails it.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from time import perf_counter
from types import ModuleType

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import backprop

# ops whose result the host must wait for: a value read back, or an output sized by the data
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose",
    "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::repeat_interleave",
})


class Recorder(TorchDispatchMode):
    """Records the name of every aten op dispatched while it is active (``aten::add.Tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Count:
    names: tuple[str, ...]  # aten::op.overload, in dispatch order

    @property
    def ops(self) -> int:
        return len(self.names)

    @property
    def syncs(self) -> int:
        return sum(n.split(".")[0] in SYNC_OPS for n in self.names)

    def __str__(self) -> str:
        return f"{self.ops} ({self.syncs} sync)" if self.syncs else str(self.ops)


def record(fn: Callable[[], object]) -> tuple[object, Count]:
    with Recorder() as r:
        result = fn()
    return result, Count(tuple(r.names))


@dataclass(frozen=True)
class Case:
    """One notebook-scale benchmark group: op, label, args, options, dout, and aten's pair."""

    op: str
    label: str
    args: tuple
    options: dict
    dout: torch.Tensor
    native: Callable | None  # native(*args, dout=, **options) -> (fwd_bwd, bwd) or None


@cache
def _bench_module(op: str) -> ModuleType:
    """benchmarks/bench_<op>.py of the checkout (make_args and native): not an installed module."""
    from backprop.testing.opinfo import OPS as TABLE

    path = TABLE[op].bench_file
    spec = importlib.util.spec_from_file_location(f"_dispatch_bench_{op}", path)
    if spec is None or not path.exists():
        raise FileNotFoundError(f"{path}: the dispatch counts use the benchmarks' inputs (run from a checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases() -> list[Case]:
    """Every op's notebook-scale benchmark inputs, as the paired benchmark builds them (batch_norm
    with correction 0 and 1, the two groups it times)."""
    from backprop.testing.opinfo import OP_DB

    out = []
    for info in OP_DB:
        bench = _bench_module(info.name)
        for label, (dims, size) in info.benchmark_shapes.items():
            if size != "small":
                continue
            if hasattr(bench, "make_args"):
                args = bench.make_args(dims)
                options = bench.options(dims) if hasattr(bench, "options") else {}
            else:  # a benchmark file of another form: the op table's first fixed case, notebook-scale
                args, options = info.fixed_cases("cpu")[0]
            variants = [{"correction": c} for c in (0, 1)] if info.name == "batch_norm" else [{}]
            for extra in variants:
                opts = {**options, **extra}
                out_, _ = info.module.forward(*args, **opts)
                dout = torch.randn(out_.shape, dtype=out_.dtype, generator=torch.Generator().manual_seed(0))
                name = " ".join([label, *(f"{k}={v}" for k, v in extra.items())])
                out.append(Case(info.name, name, args, opts, dout, getattr(bench, "native", None)))
    return out


@dataclass(frozen=True)
class Row:
    case: Case
    ours_fwd: Count
    ours_bwd: Count
    torch_fwd: Count  # autograd: the reference's forward with requires_grad inputs
    torch_bwd: Count  # autograd: torch.autograd.grad on that graph
    native: Count | None  # aten's forward and backward ops, one call each (None: torch has none)


def _leaves(args: tuple) -> tuple[tuple, list[torch.Tensor]]:
    leaves = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                   else a for a in args)
    return leaves, [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]


def measure(case: Case) -> Row:
    """One warm-up call of each path, then one recorded call."""
    from backprop.testing.opinfo import OPS as TABLE

    op, ref = backprop.OPS[case.op], TABLE[case.op].reference
    def once() -> Row:
        (_, cache_), ours_fwd = record(lambda: op.forward(*case.args, **case.options))
        _, ours_bwd = record(lambda: op.backward(case.dout, cache_))
        leaves, wrt = _leaves(case.args)
        out, torch_fwd = record(lambda: ref(*leaves, **case.options))
        _, torch_bwd = record(lambda: torch.autograd.grad(out, wrt, case.dout))
        steps = case.native(*case.args, dout=case.dout, **case.options) if case.native else None
        return Row(case, ours_fwd, ours_bwd, torch_fwd, torch_bwd, record(steps[0])[1] if steps else None)

    once()  # warm-up: lazy initialisation on a first call is not the op's
    return once()


def rows() -> list[Row]:
    return [measure(c) for c in cases()]


def over_bounds(measured: list[Row], bounds: dict[str, tuple[int, int, int, int]]) -> list[str]:
    """bounds: "<op> <label>" -> (fwd ops, fwd syncs, bwd ops, bwd syncs), the most ours may take.
    Returns one line per count above its bound (and per case without a bound); [] when all fit."""
    problems = []
    for r in measured:
        key = f"{r.case.op} {r.case.label}"
        if key not in bounds:
            problems.append(f"{key}: no bound pinned; measured (fwd ops, fwd syncs, bwd ops, bwd syncs) = "
                            f"{_counts(r)}")
            continue
        got = (r.ours_fwd.ops, r.ours_fwd.syncs, r.ours_bwd.ops, r.ours_bwd.syncs)
        for what, g, b in zip(("forward ops", "forward syncs", "backward ops", "backward syncs"), got,
                              bounds[key]):
            if g > b:
                calls = r.ours_fwd.names if what.startswith("forward") else r.ours_bwd.names
                problems.append(f"{key}: {what} {g} > bound {b}: {', '.join(calls)}")
    return problems


def _counts(r: Row) -> tuple[int, int, int, int]:
    return (r.ours_fwd.ops, r.ours_fwd.syncs, r.ours_bwd.ops, r.ours_bwd.syncs)


# ---------------------------------------------------------------- timing (--time)


def interleaved_us(fns: dict[str, Callable[[], object]], calls: int = 3000) -> dict[str, tuple[float, float]]:
    """(p10, p50) microseconds of one call of each fn, the fns called in turn (so that a busy
    machine slows them alike); p10 is what a call costs when nothing else gets in its way."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(calls):
        for k, f in fns.items():
            start = perf_counter()
            f()
            times[k].append(perf_counter() - start)
    return {k: (1e6 * statistics.quantiles(v, n=10)[0], 1e6 * statistics.median(v)) for k, v in times.items()}


TIMED = ("ours fwd+bwd", "ours maths only", "autograd fwd+bwd", "native fwd+bwd")


def timings(case: Case, calls: int = 3000) -> dict[str, tuple[float, float]]:
    """One forward and backward: ours (the public calls); ours maths only (forward_math and
    backward_math on prepared args, under no_grad: what the checks, the cache and the grad mode
    cost is the difference); torch's autograd; aten's native pair."""
    from backprop.testing.opinfo import OPS as TABLE

    op, ref = backprop.OPS[case.op], TABLE[case.op].reference
    prepared = op.prepare(*case.args, **case.options)
    leaves, wrt = _leaves(case.args)

    def maths():
        with torch.no_grad():
            return op.backward_math(case.dout, op.forward_math(prepared)[1])

    fns = {"ours fwd+bwd": lambda: op.backward(case.dout, op.forward(*case.args, **case.options)[1]),
           "ours maths only": maths,
           "autograd fwd+bwd": lambda: torch.autograd.grad(ref(*leaves, **case.options), wrt, case.dout)}
    steps = case.native(*case.args, dout=case.dout, **case.options) if case.native else None
    if steps:
        fns["native fwd+bwd"] = steps[0]
    return interleaved_us(fns, calls)


def dispatch_cost_us(calls: int = 20000) -> dict[str, tuple[float, float]]:
    """What one dispatch costs from Python here: a view (no allocation) and a small add."""
    x = torch.randn(32, 27)
    return interleaved_us({"x.view(-1)": lambda: x.view(-1), "x + 1 (32x27)": lambda: x + 1}, calls)


# ---------------------------------------------------------------- the table


def table(measured: list[Row]) -> str:
    lines = ["| op | shape | ours fwd | ours bwd | ours total | autograd fwd | autograd bwd | "
             "autograd total | native fwd+bwd |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in measured:
        ours = Count(r.ours_fwd.names + r.ours_bwd.names)
        torch_ = Count(r.torch_fwd.names + r.torch_bwd.names)
        lines.append(f"| {r.case.op} | {r.case.label} | {r.ours_fwd} | {r.ours_bwd} | {ours} | "
                     f"{r.torch_fwd} | {r.torch_bwd} | {torch_} | {r.native or '—'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backprop.bench.dispatch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--names", action="store_true", help="list every op's aten calls, in order")
    parser.add_argument("--time", action="store_true", help="microseconds a call (p10 / p50), 1 thread")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    measured = rows()
    print("aten ops dispatched by one call, (n sync): host syncs among them. "
          f"torch {torch.__version__}, CPU, float32.\n")
    print(table(measured))
    if a.names:
        for r in measured:
            print(f"\n### {r.case.op} {r.case.label}\n")
            for what, c in (("ours fwd", r.ours_fwd), ("ours bwd", r.ours_bwd), ("autograd fwd", r.torch_fwd),
                            ("autograd bwd", r.torch_bwd), ("native fwd+bwd", r.native)):
                if c is not None:
                    print(f"- {what} ({c}): {', '.join(n.removeprefix('aten::') for n in c.names)}")
    if a.time:
        print("\nmicroseconds a call, p10 / p50 over 3000 calls interleaved (1 thread, one process: a guide, "
              "the paired benchmark is the claim)\n")
        print("| op | shape | " + " | ".join(TIMED) + " |")
        print("|---|---|" + "---:|" * len(TIMED))
        for r in measured:
            t = timings(r.case)
            cells = [f"{t[k][0]:.1f} / {t[k][1]:.1f}" if k in t else "—" for k in TIMED]
            print(f"| {r.case.op} | {r.case.label} | " + " | ".join(cells) + " |")
        costs = ", ".join(f"{k} {p10:.2f} / {p50:.2f} us" for k, (p10, p50) in dispatch_cost_us().items())
        print(f"\none dispatch from Python (p10 / p50): {costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
