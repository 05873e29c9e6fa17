"""``backprop grade SOLUTION``: run a learner's .py or .ipynb, then grade the gradients it left behind."""

from __future__ import annotations

import argparse
import contextlib
import json
import linecache
import os
import runpy
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from backprop.exercise.forward import ATOMS, GRADS, PARAMS
from backprop.exercise.grade import GradeResult, grade


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
    if not isinstance(cells, list) or not all(isinstance(cell, dict) for cell in cells):
        raise ValueError("not a Jupyter notebook: its cells are not a list of objects")
    out = []
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) and all(isinstance(s, str) for s in src) else src
        if not isinstance(src, str):
            raise ValueError("not a Jupyter notebook: a code cell's source is not text")
        if src.lstrip().startswith("%%"):
            out.append("")  # a cell magic makes the whole cell non-Python; it keeps its number
            continue
        # a line magic or shell line becomes a blank line: the cell's other lines keep their numbers
        lines = ["" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines()]
        out.append("\n".join(lines))
    return out


def run_solution(path: Path, states: list[tuple[int, dict[str, object]]] | None = None) -> dict[str, object]:
    """Run a .py or .ipynb in a fresh namespace and return its globals.

    For a notebook, ``states`` (if given) gets (cell number, what grade() reads) after each code cell, the
    parameters and the batch copied: a later cell, say exercise 4's training loop, may change them in place.
    """
    path = path.resolve()
    with _in_dir(path.parent), _plotting_stub():
        if path.suffix == ".py":
            return runpy.run_path(str(path), run_name="__main__")
        ns: dict[str, object] = {"__name__": "__main__", "__file__": str(path)}
        for i, code in enumerate(notebook_code(path)):
            name = f"{path.name}, cell {i + 1}"
            linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)  # for error lines
            exec(compile(code, name, "exec"), ns)
            if states is not None:
                states.append((i + 1, _state(ns)))
        return ns


def _state(ns: dict[str, object]) -> dict[str, object]:
    copied = (*PARAMS, "Xb", "Yb")
    return {k: v.detach().clone() if k in copied and isinstance(v, torch.Tensor) else v
            for k, v in ns.items() if k in (*copied, "n", *ATOMS, *GRADS)}


def _trained(ns: dict[str, object], state: dict[str, object]) -> bool:
    """Whether a later cell changed the parameters or the batch of ``state`` (exercise 4's training
    loop, a new batch): only then is an earlier state the one to grade."""
    def same(a: object, b: object) -> bool:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.detach().cpu(), b.cpu()))
        return a is b
    return any(not same(ns.get(k), state.get(k)) for k in (*PARAMS, "Xb", "Yb"))


def _grade_last_state(ns: dict[str, object], states: list[tuple[int, dict[str, object]]]) -> GradeResult:
    """grade(ns); if the notebook's end can't be graded because a later cell trained the parameters or
    drew a new batch after exercise 1's forward (exercise 4), the state after the last cell that can,
    saying which. Any other reason the end can't be graded (an atom or gradient changed after the
    backward, say) is the notebook's answer: it is raised, never graded from an earlier state."""
    try:
        return grade(ns)
    except (ValueError, TypeError) as at_end:
        for cell, state in reversed(states):
            if not _trained(ns, state):
                continue
            try:
                result = grade(state, quiet=True)
            except (ValueError, TypeError):
                continue
            if len(result.missing) < len(result.rows):
                why = str(at_end).removeprefix("grade(namespace): ").split(";")[0]
                print(f"graded the notebook as it stood after cell {cell} of {states[-1][0]}, the last state "
                      f"that grades; at its end, {why}")
                print(result)
                return result
        raise


def cli_main(argv: list[str]) -> int:
    """``backprop grade SOLUTION`` (``argv`` is what follows ``grade``): 0 when every done gradient
    passes, 1 when one is wrong, 2 for bad input or a solution that raises."""
    parser = argparse.ArgumentParser(prog="backprop grade", description=__doc__)
    parser.add_argument("solution", type=Path, help="a .py script or .ipynb notebook of the exercise")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    path: Path = args.solution
    if path.suffix not in (".py", ".ipynb"):
        return _fail(path, "expected a .py or .ipynb file")
    if path.is_dir():
        return _fail(path, "a directory, not a file")
    if not path.is_file():
        return _fail(path, "no such file")
    if path.suffix == ".ipynb":
        try:
            notebook_code(path)
        except ValueError as e:
            return _fail(path, str(e))
    states: list[tuple[int, dict[str, object]]] = []
    try:
        ns = run_solution(path, states)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a learner's sys.exit() or error ends the run, not the grader
        return _fail(path, _raised(e, path.resolve()))
    try:
        result = _grade_last_state(ns, states)
    except (ValueError, TypeError) as e:
        if path.suffix == ".py" and "re-run the forward cell" in str(e):  # a script has no cells to re-run
            return _fail(path, f"{e}; a script is graded as it ends: if code after the backward pass "
                               f"changes the parameters (exercise 4's training loop), grade a copy that stops "
                               f"before it")
        return _fail(path, str(e))
    return 0 if result.passed else 1


def _raised(e: BaseException, path: Path) -> str:
    """What the solution raised, and where in it: the last line of the solution's own code that ran."""
    mine = [f for f in traceback.extract_tb(e.__traceback__)
            if f.filename == str(path) or f.filename.startswith(f"{path.name}, cell ")]
    where = ""
    if mine and not isinstance(e, SyntaxError):  # a SyntaxError's message has its line
        f = mine[-1]
        cell = f.filename.removeprefix(path.name).removeprefix(", ") if f.filename != str(path) else ""
        where = f" (at {cell + ', ' if cell else ''}line {f.lineno}" + (f": {f.line})" if f.line else ")")
    text = f"the solution raised {type(e).__name__}: {e}{where}"
    if isinstance(e, FileNotFoundError) and e.filename and not os.path.isabs(e.filename):
        text += (f"; relative paths are read from the solution's folder, {path.parent}, and `!` shell lines "
                 f"such as !wget are not run")
    return text


def _fail(path: Path, why: str) -> int:
    print(f"backprop grade: {path}: {why}".replace("\n", " "), file=sys.stderr)
    return 2
