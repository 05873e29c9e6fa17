"""``backprop grade SOLUTION``: run a learner's .py or .ipynb, then grade the gradients it left behind."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import sys
import types
from collections.abc import Iterator
from pathlib import Path


class _Anything:
    """Stands in for every matplotlib object: calls, attributes and items all give another one."""

    def __call__(self, *args: object, **kwargs: object) -> _Anything:
        return self

    def __getattr__(self, name: str) -> _Anything:
        return self

    def __getitem__(self, key: object) -> _Anything:
        return self

    def __iter__(self) -> Iterator[_Anything]:
        return iter((self, self))  # fig, ax = plt.subplots()


@contextlib.contextmanager
def _plotting_stub() -> Iterator[None]:
    """Plots are no part of grading: without matplotlib, its imports get a stub that draws nothing."""
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        matplotlib.use("Agg")  # never open a window while grading
        yield
        return
    absent = object()
    saved = {k: sys.modules.get(k, absent) for k in ("matplotlib", "matplotlib.pyplot")}
    for name in saved:
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr: _Anything()  # type: ignore[method-assign]
        sys.modules[name] = stub
    sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"]  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is absent:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@contextlib.contextmanager
def _in_dir(folder: Path) -> Iterator[None]:
    """Run the solution from its own folder, where its open('names.txt') expects to be."""
    old_cwd, old_path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path


def notebook_code(path: Path) -> list[str]:
    """The code cells of a notebook, in order, with IPython magics and shell lines stripped."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a Jupyter notebook: {type(e).__name__}: {e}") from e
    out = []
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if src.lstrip().startswith("%%"):
            continue  # a cell magic makes the whole cell non-Python
        lines = [ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        out.append("\n".join(lines))
    return out


def run_solution(path: Path) -> dict[str, object]:
    """Run a .py or .ipynb in a fresh namespace and return its globals."""
    path = path.resolve()
    with _in_dir(path.parent), _plotting_stub():
        if path.suffix == ".py":
            return runpy.run_path(str(path), run_name="__main__")
        ns: dict[str, object] = {"__name__": "__main__", "__file__": str(path)}
        for i, code in enumerate(notebook_code(path)):
            exec(compile(code, f"{path.name}, cell {i + 1}", "exec"), ns)
        return ns


def cli_main(argv: list[str]) -> int:
    """``backprop grade SOLUTION`` (``argv`` is what follows ``grade``): 0 when every done gradient
    passes, 1 when one is wrong, 2 for bad input or a solution that raises."""
    from backprop.exercise.grade import grade

    parser = argparse.ArgumentParser(prog="backprop grade", description=__doc__)
    parser.add_argument("solution", type=Path, help="a .py script or .ipynb notebook of the exercise")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    path: Path = args.solution
    if path.suffix not in (".py", ".ipynb"):
        return _fail(path, "expected a .py or .ipynb file")
    if not path.is_file():
        return _fail(path, "no such file")
    try:
        ns = run_solution(path)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a learner's sys.exit() or error ends the run, not the grader
        return _fail(path, f"the solution raised {type(e).__name__}: {e}")
    try:
        result = grade(ns)
    except (ValueError, TypeError) as e:
        return _fail(path, str(e))
    return 0 if result.passed else 1


def _fail(path: Path, why: str) -> int:
    print(f"backprop grade: {path}: {why}".replace("\n", " "), file=sys.stderr)
    return 2
