"""The op table covers every op, and every op has its files: adding an op without its entry, or an
entry without its module, test or benchmark, fails here instead of being silently left out."""

import ast
from pathlib import Path

import torch

import backprop
from backprop import compiled
from backprop.testing.opinfo import OP_DB, ROOT
from backprop.testing.references import REFERENCES


def op_modules(package: Path) -> set[str]:
    """The op modules of a package directory: a module is an op iff it defines the pair
    ``forward`` and ``backward`` and a ``Cache`` at top level (names starting with _ are private)."""
    found = set()
    for path in package.glob("*.py"):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text())
        defined = {node.name for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        if {"forward", "backward", "Cache"} <= defined:
            found.add(path.stem)
    return found


def table_gaps(root: Path, ops: list[str], table: list[str]) -> list[str]:
    """What is missing between the op modules under root, the library's list and the op table."""
    modules = op_modules(root / "backprop")
    gaps = [f"backprop/{m}.py is an op but not in backprop.OPS" for m in sorted(modules - set(ops))]
    gaps += [f"backprop.OPS has {m}, which is not an op module" for m in ops if m not in modules]
    gaps += [f"{m} has no OpInfo in backprop.testing.opinfo.OP_DB" for m in ops if m not in table]
    gaps += [f"OP_DB has {m}, which is not in backprop.OPS" for m in table if m not in ops]
    for m in table:
        gaps += [f"{m} has no {f}" for f in (f"tests/test_{m}.py", f"benchmarks/bench_{m}.py")
                 if not (root / f).is_file()]
    return gaps


def test_every_op_has_one_entry_and_its_files():
    assert table_gaps(ROOT, list(backprop.OPS), [info.name for info in OP_DB]) == []


def test_the_table_is_the_library_list_in_order():
    assert [info.name for info in OP_DB] == list(backprop.OPS)
    assert all(info.module is backprop.OPS[info.name] for info in OP_DB)
    assert list(compiled.OPS) == list(backprop.OPS)
    assert all(REFERENCES[info.name] is info.reference for info in OP_DB)


def test_every_entry_is_complete():
    for info in OP_DB:
        assert info.fixed_cases("cpu"), info.name
        assert any(size == "small" for _, size in info.benchmark_shapes.values()), info.name
        assert all(size in ("small", "large", "xl", "gpu") for _, size in info.benchmark_shapes.values()), info.name
        # the first large shape is also the top of the op's size sweep (benchmarks/conftest.py)
        assert "large" in [size for _, size in info.benchmark_shapes.values()], info.name


def test_small_cases_keep_shapes_and_options_across_seeds():
    """test_dropin's vmap stacks the k-th small case over seeds, and gradgradcheck differences every
    entry: each op has some, tiny, the k-th one of the same shapes and option names under any seed."""
    def layout(case):
        args, options = case
        return [getattr(a, "shape", a) for a in args], sorted(options)

    for info in OP_DB:
        first = info.small_cases(0)
        assert first, info.name
        assert [layout(c) for c in info.small_cases(5)] == [layout(c) for c in first], info.name
        assert all(a.numel() <= 64 for args, _ in first for a in args if isinstance(a, torch.Tensor)), info.name
        assert {a.dtype for args, _ in info.small_cases(0, torch.float32) for a in args
                if isinstance(a, torch.Tensor) and a.is_floating_point()} == {torch.float32}, info.name


def test_a_new_op_without_its_entry_or_files_is_reported(tmp_path):
    """The check can fail: a fake checkout with an op module that nothing else knows about."""
    (tmp_path / "backprop").mkdir()
    (tmp_path / "backprop" / "swish.py").write_text(
        "from typing import NamedTuple\n\nclass Cache(NamedTuple):\n    x: object\n\n"
        "def forward(x):\n    return x, Cache(x)\n\ndef backward(dout, cache):\n    return (dout,)\n")
    (tmp_path / "backprop" / "cli.py").write_text("def main():\n    pass\n")  # not an op
    assert table_gaps(tmp_path, [], []) == ["backprop/swish.py is an op but not in backprop.OPS"]
    assert table_gaps(tmp_path, ["swish"], []) == ["swish has no OpInfo in backprop.testing.opinfo.OP_DB"]
    assert table_gaps(tmp_path, ["swish"], ["swish"]) == [
        "swish has no tests/test_swish.py", "swish has no benchmarks/bench_swish.py"]
    assert table_gaps(tmp_path, ["swish", "cli"], ["swish", "gelu"]) == [
        "backprop.OPS has cli, which is not an op module", "cli has no OpInfo in backprop.testing.opinfo.OP_DB",
        "OP_DB has gelu, which is not in backprop.OPS", "swish has no tests/test_swish.py",
        "swish has no benchmarks/bench_swish.py", "gelu has no tests/test_gelu.py",
        "gelu has no benchmarks/bench_gelu.py"]
