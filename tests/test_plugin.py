"""The pytest plugin (backprop.pytest_plugin): inert unless asked; both kinds of implementation;
suite power printed and enforced; xfails; and the worked example run as a user runs it."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# pytester's in-process runs drop the modules each imported: one that imported torch._dynamo or
# backprop.library first left the next to import it again, re-registering its ops (a RuntimeError)
import torch._dynamo  # noqa: F401

import backprop
import backprop.library  # noqa: F401
from backprop import pytest_plugin
from backprop.plugin.implementations import adapt, detect, load
from backprop.testing import CheckFailure, check_against_autograd, references
from backprop.testing.mutants import MUTANTS as CATALOGUE
from backprop.testing.strategies import FLOAT_DTYPES

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mykernels"
TANH_BUGS = sum(m.op == "tanh" for m in CATALOGUE)  # tanh's known bugs in the catalogue
FAST = ("-p", "backprop.pytest_plugin", "-p", "no:cacheprovider", "--backprop-max-examples", "5")

# a bug the suite cannot catch: the kernel itself, under another name (an equivalent mutant)
EQUIVALENT = """
from types import SimpleNamespace
from backprop import tanh
MUTANTS = [SimpleNamespace(forward=tanh.forward, backward=tanh.backward, Cache=tanh.Cache,
                           __name__="tanh_equivalent", __doc__="No bug at all.", op="tanh")]
"""


def record_dtypes(monkeypatch):
    """Patch the oracle and gradcheck out of every check (suite power's included): the set they fill
    with the dtype of every tensor, positional or option, of each case they are handed."""
    import backprop.testing.suite as suite
    from backprop.plugin import checks

    seen = set()

    def record(name, op, case, **kwargs):
        args, options = case
        seen.update(t.dtype for t in (*args, *options.values()) if isinstance(t, torch.Tensor))

    # the suite the checks hold, and the one suite power imports when it runs: the package
    # backprop.plugin keeps an earlier in-process run's checks, and so its suite, which that run dropped
    for module in {suite, checks.suite}:
        monkeypatch.setattr(module, "check_case", record)
        monkeypatch.setattr(module, "gradcheck_case", lambda *a, **k: True)
    return seen


class Tanh(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return dout * (1 - y) * (1 + y)


def test_plugin_module_imports_nothing_heavy_at_load():
    """Installed through pytest11, it loads in every session of the environment: the harness,
    hypothesis and the user's code are imported only when an implementation is named."""
    tree = ast.parse(Path(pytest_plugin.__file__).read_text())
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= {"__future__", "os", "warnings", "pathlib", "typing", "pytest"}


@pytest.mark.parametrize("obj, kind", [(backprop.tanh, "contract"), (Tanh, "autograd"),
                                       (torch.tanh, "autograd"), (torch.nn.Tanh(), "autograd")])
def test_kind_is_detected(obj, kind):
    assert detect(obj) == kind


@pytest.mark.parametrize("impl", [Tanh, Tanh.apply, torch.tanh])
def test_autograd_kind_meets_the_contract(impl):
    op = adapt(impl, references.tanh, "tanh")
    check_against_autograd(op, references.tanh, torch.randn(4, 5))


def test_autograd_kind_owes_a_gradient_to_an_omitted_optional_tensor():
    op = adapt(torch.nn.functional.linear, references.linear, "linear")
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    report = check_against_autograd(op, references.linear, x, w)
    assert [r.name for r in report] == ["out", "dx", "dweight"]
    assert len(op.backward(torch.ones(3, 2), op.forward(x, w)[1])) == 3


def test_autograd_kind_bug_is_caught():
    op = adapt(lambda x: torch.tanh(x) * 1.0001, references.tanh, "off")
    with pytest.raises(CheckFailure, match=r"\[forward\]"):
        check_against_autograd(op, references.tanh, torch.randn(4, 5))


def test_load_reads_the_kind_after_at():
    op, kind = load("tanh", "backprop.tanh@contract")
    assert kind == "contract" and op is backprop.tanh
    with pytest.raises(ValueError, match="unknown kind"):
        load("tanh", "backprop.tanh@fused")


def test_inert_without_an_implementation(pytester):
    pytester.makepyfile("def test_one():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "backprop.pytest_plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("backprop:*")  # the report header names the implementations
    result.stdout.no_fnmatch_line("*suite power*")
    result.stdout.fnmatch_lines(["collected 1 item"])


def test_check_kernel_fixture(pytester):
    pytester.makepyfile("""
        import torch
        def test_mine(check_kernel):
            report = check_kernel(torch.tanh, "tanh", torch.randn(3, 4))
            assert [r.name for r in report] == ["out", "dx"]
    """)
    pytester.runpytest_inprocess("-p", "backprop.pytest_plugin", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_every_check_of_a_correct_kernel_passes_with_power_printed(pytester):
    result = pytester.runpytest_inprocess(*FAST, "--backprop-impl", "tanh=backprop.tanh", "-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*backprop[[]tanh::gradient_vs_float64[]] PASSED*",
                                 f"*suite power: {TANH_BUGS} of {TANH_BUGS} known bugs caught*"])


def test_a_bug_the_suite_cannot_catch_fails_the_session(pytester):
    pytester.makepyfile(equivalent=EQUIVALENT)
    pytester.syspathinsert()
    result = pytester.runpytest_inprocess(*FAST, "--backprop-impl", "tanh=backprop.tanh", "-k", "suite_power",
                                          "--backprop-mutants", "equivalent:MUTANTS")
    result.assert_outcomes(failed=1, deselected=5)
    result.stdout.fnmatch_lines(["*MISSED*tanh_equivalent*No bug at all.*",
                                 f"*suite power: {TANH_BUGS} of {TANH_BUGS + 1} known bugs caught; MISSED: tanh_equivalent*"])


def test_a_suite_without_its_oracle_fails_the_session(pytester, monkeypatch):
    """Remove the killer checks: the kernel's own tests go green, and suite power says why not to trust them."""
    import backprop.testing.suite as suite

    monkeypatch.setattr(suite, "check_case", lambda *a, **k: None)
    monkeypatch.setattr(suite, "gradcheck_case", lambda *a, **k: True)
    result = pytester.runpytest_inprocess(*FAST, "--backprop-impl", "tanh=backprop.tanh", "-k", "suite_power")
    result.assert_outcomes(failed=1, deselected=5)
    result.stdout.fnmatch_lines([f"*suite power: 0 of {TANH_BUGS} known bugs caught*"])


def test_xfails_file_and_readable_failure(pytester):
    pytester.syspathinsert(EXAMPLE / "src")
    args = (*FAST, "--backprop-impl", "cross_entropy=mykernels.cross_entropy", "-k", "fixed_cases")
    result = pytester.runpytest_inprocess(*args)
    result.assert_outcomes(failed=1, deselected=5)
    result.stdout.fnmatch_lines(["*[[]gradient[]] mykernels.cross_entropy.backward disagrees with autograd*",
                                 "verdict*tensor*our err*torch err*", "FAIL*dlogits*float32*48x27*",
                                 "FAILED backprop[[]cross_entropy::fixed_cases[]]*"])
    xfails = pytester.makefile(".txt", xfails="# known\nbackprop[cross_entropy::fixed_cases]  # mean over N\n"
                                               "backprop[cross_entropy::nothing]  # a typo\n")
    result = pytester.runpytest_inprocess(*args, "--backprop-xfails", str(xfails), "-rx")
    result.assert_outcomes(xfailed=1, deselected=5)  # the warning is matched by its text below
    result.stdout.fnmatch_lines(["*xfails name no generated test: backprop[[]cross_entropy::nothing[]]*",
                                 "XFAIL backprop[[]cross_entropy::fixed_cases[]] - mean over N"])


def test_end_to_end_the_worked_example_as_a_user_runs_it(tmp_path):
    """pytest in the example's own folder, its [tool.backprop] table naming both ops: the correct
    one passes, the buggy one fails with its table, and suite power is printed. A second pytest
    session (~20 s of the default run's 4 minutes): the thorough profile runs it; CI runs the same
    check on the installed packages in a fresh venv (examples/run.sh)."""
    from hypothesis import settings

    if settings().max_examples < 100:
        pytest.skip("a second pytest session: HYPOTHESIS_PROFILE=thorough runs it, CI runs examples/run.sh")
    shutil.copytree(EXAMPLE, tmp_path / "mykernels", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    # one torch thread, as each pytest-xdist worker runs: two threads spin against the other worker
    # on 2 cores (this run took 28 s of CPU time with two threads, 12 s with one)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "mykernels" / "src")])}
    run = subprocess.run([sys.executable, "-m", "pytest", *FAST, "-rA"], cwd=tmp_path / "mykernels",
                         env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "FAILED backprop[cross_entropy::fixed_cases]" in out
    assert "FAIL     dlogits" in out
    # the example's one bug, in backward's 'mean', is all that fails: the checks that compare
    # gradients catch it, each with one falsifying example; strided inputs and bad inputs pass
    assert all(f"FAILED backprop[cross_entropy::{c}]" in out for c in ("gradient_vs_float64", "gradcheck"))
    assert all(f"PASSED backprop[cross_entropy::{c}]" in out for c in ("suite_power", "noncontiguous", "bad_inputs"))
    assert "ExceptionGroup" not in out, out
    assert all(f"PASSED backprop[tanh::{c}]" in out for c in
               ("suite_power", "fixed_cases", "gradient_vs_float64", "gradcheck", "noncontiguous", "bad_inputs"))
    assert "backprop: tanh=mykernels.tanh:Tanh (autograd), cross_entropy=mykernels.cross_entropy (contract)" in out
    caught = re.search(r"suite power: (\d+) of (\d+) known bugs caught", out)
    assert caught and caught[1] == caught[2] and int(caught[1]) >= 7, out  # every known bug of both ops


def test_default_dtypes_are_the_strategies_own_as_header_help_and_docs_say(pytester, monkeypatch):
    """Without --backprop-dtypes the drawn cases come in the strategies' own dtypes (float16
    included), the fixed cases in their own float32; the header, --help and docs/plugin.md say so."""
    names = [str(d).removeprefix("torch.") for d in FLOAT_DTYPES]
    seen = record_dtypes(monkeypatch)
    args = (*FAST, "--backprop-impl", "tanh=backprop.tanh", "--backprop-profile", "ci")
    result = pytester.runpytest_inprocess(*args, "--backprop-max-examples", "40", "-k", "gradient_vs_float64")
    result.assert_outcomes(passed=1, deselected=5)
    assert seen == set(FLOAT_DTYPES)
    result.stdout.fnmatch_lines([f"backprop: profile ci, max_examples 40, dtypes {','.join(names)}, device cpu"])
    seen.clear()
    pytester.runpytest_inprocess(*args, "-k", "fixed_cases").assert_outcomes(passed=1, deselected=5)
    assert seen == {torch.float32}
    usage = " ".join(pytester.runpytest_inprocess("-p", "backprop.pytest_plugin", "--help").stdout.str().split())
    assert f"(default: the strategies' own, {', '.join(names)})" in usage
    row = next(line for line in (ROOT / "docs" / "plugin.md").read_text().splitlines()
               if line.startswith("| `--backprop-dtypes"))
    assert f"the strategies' own: {', '.join(names)}" in row


def test_requested_dtypes_cast_floating_options_too(pytester, monkeypatch):
    """--backprop-dtypes casts a case's floating tensor options (class weights, running statistics)
    as its positional floats, in the fixed cases, the drawn ones and suite power's; integer targets
    stay int64."""
    seen = record_dtypes(monkeypatch)
    ops = ("cross_entropy", "batch_norm", "linear_cross_entropy")
    impls = [arg for op in ops for arg in ("--backprop-impl", f"{op}=backprop.{op}")]
    pytester.runpytest_inprocess(*FAST, *impls, "--backprop-dtypes", "bfloat16",
                                 "-k", "suite_power or fixed_cases or gradient_vs_float64")
    assert seen == {torch.bfloat16, torch.int64}


def test_own_kernels_with_class_weights_pass_fixed_cases_in_a_requested_dtype(pytester):
    """backprop's own kernels refuse class weights of another dtype than the logits (a TypeError)."""
    impls = ("--backprop-impl", "cross_entropy=backprop.cross_entropy",
             "--backprop-impl", "linear_cross_entropy=backprop.linear_cross_entropy")
    result = pytester.runpytest_inprocess(*FAST, *impls, "--backprop-dtypes", "bfloat16", "-k", "fixed_cases")
    result.assert_outcomes(passed=2, deselected=10)


def test_summary_when_suite_power_did_not_run(pytester):
    """--co prints no suite power; with its tests deselected, a plain line says it was not run (not
    a red 0 of 0, which reads as a failure); an op's run alongside another's not run is still green."""
    args = (*FAST, "--backprop-impl", "tanh=backprop.tanh", "--color=yes")
    result = pytester.runpytest_inprocess(*args, "--co")
    assert "suite power" not in result.stdout.str() and "backprop =" not in result.stdout.str()
    result = pytester.runpytest_inprocess(*args, "-k", "bad_inputs")
    result.assert_outcomes(passed=1, deselected=5)
    line = next(line for line in result.stdout.lines if "suite power" in line)
    assert line == "suite power: not run for tanh", repr(line)  # no colour
    result = pytester.runpytest_inprocess(*args, "--backprop-impl", "logsumexp=backprop.logsumexp",
                                          "-k", "tanh and suite_power")
    result.assert_outcomes(passed=1, deselected=11)
    line = next(line for line in result.stdout.lines if "suite power" in line)
    assert line.startswith("\x1b[32m") and "\x1b[31m" not in line, repr(line)
    assert f"suite power: {TANH_BUGS} of {TANH_BUGS} known bugs caught; not run for logsumexp" in line, line
