"""Mutation score of the kernel modules, in one process.

cosmic-ray's operators make the mutants (the same list `cosmic-ray init` makes for a module),
and each mutant is swapped into the real ``backprop.<op>`` module object while the op's own tests
run in-process under pytest: tests/test_<op>.py (property tests against autograd and float64,
gradcheck, bad-input tables), the contract tests and the fuzzed bad inputs for that op. A mutant
is killed when any of them fails. Loading torch once instead of once per mutant makes this about
10x faster than cosmic-ray's own driver (one pytest process per mutant). The ops are those of the
op table (backprop.testing.opinfo.OP_DB). `tox -e mutation` runs it.

    python tests/mutation/score.py tanh linear          # or no names: every op
    python tests/mutation/score.py --out .mutation      # writes <op>.json: every mutant and its fate
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's backprop, the one whose tests run
from backprop.testing.opinfo import OP_DB  # noqa: E402

OPS = [info.name for info in OP_DB]
TIME_LIMIT_S = 120


def mutants(path: Path) -> Iterator[tuple[str, int, int, str]]:
    """(operator, occurrence, line, mutated source) for every mutation cosmic-ray would make."""
    import cosmic_ray.plugins
    from cosmic_ray.ast import ast_nodes, get_ast
    from cosmic_ray.mutating import mutate_code

    source = path.read_text()
    tree = get_ast(source)
    skip = annotation_spans(source)
    for name in cosmic_ray.plugins.operator_names():
        cls = cosmic_ray.plugins.get_operator(name)
        if cls.arguments():  # parametrised operators run only when configured; none is here
            continue
        operator = cls()
        positions = [start for node in ast_nodes(tree) for start, _ in operator.mutation_positions(node)]
        for occurrence, start in enumerate(positions):
            if any(a <= start < b for a, b in skip):
                continue  # inside an annotation: never evaluated (from __future__ import annotations)
            code = mutate_code(source, operator, occurrence)
            if code is not None:
                yield name, occurrence, start[0], code


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions, (line, column), of every annotation in the module."""
    import ast

    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            notes = [a.annotation for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                                              node.args.vararg, node.args.kwarg) if a is not None]
            notes.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            notes = [node.annotation]
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in notes if n is not None]
    return spans


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Timeout("the mutant ran past the time limit")


def run_tests(op: str) -> int:
    import pytest

    args = ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore",
            f"tests/test_{op}.py", "tests/test_contract.py", "tests/test_fuzz_bad_inputs.py", "-k", op]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return pytest.main(args)


def score(op: str, out: Path) -> dict:
    import importlib

    module = importlib.import_module(f"backprop.{op}")
    original = dict(module.__dict__)
    path = ROOT / "backprop" / f"{op}.py"
    assert run_tests(op) == 0, f"the tests of {op} fail on the real kernel"
    results = []
    for operator, occurrence, line, code in mutants(path):
        t = time.perf_counter()
        try:
            exec(compile(code, str(path), "exec"), module.__dict__)  # the mutant, in the real module
            signal.alarm(TIME_LIMIT_S)  # a hang counts as killed, as in cosmic-ray
            killed = run_tests(op) != 0
        except Exception as e:  # the mutant does not even load, or hangs
            killed, code = True, f"{code}\n# load error: {e!r}"
        finally:
            signal.alarm(0)
            module.__dict__.clear()
            module.__dict__.update(original)
        diff = [f"{a.rstrip()}  ->  {b.strip()}" for a, b in
                zip(path.read_text().splitlines(), code.splitlines()) if a != b][:1]
        results.append({"operator": operator, "occurrence": occurrence, "line": line,
                        "killed": killed, "change": diff[0] if diff else "", "seconds": round(time.perf_counter() - t, 2)})
        print(f"{op} {len(results):4d} {'killed  ' if killed else 'SURVIVED'} {results[-1]['seconds']:6.1f}s line {line:4d} "
              f"{operator} {diff[0].strip() if diff else ''}", flush=True)
    summary = {"op": op, "mutants": len(results), "killed": sum(r["killed"] for r in results),
               "survived": [r for r in results if not r["killed"]], "results": results}
    (out / f"{op}.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="*", default=OPS, choices=OPS + [[]], metavar="op")
    p.add_argument("--out", type=Path, default=ROOT / ".mutation")
    args = p.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("HYPOTHESIS_PROFILE", "mutation")
    signal.signal(signal.SIGALRM, _alarm)
    args.out.mkdir(parents=True, exist_ok=True)
    for op in args.ops or OPS:
        s = score(op, args.out)
        print(f"{op}: {s['killed']}/{s['mutants']} killed, {len(s['survived'])} survived", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
