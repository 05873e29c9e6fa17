"""pytest plugin: run backprop's per-op suite against your own kernel (docs/plugin.md).

    pytest --backprop-impl cross_entropy=mypkg.ops:fused_ce --backprop-impl tanh=mypkg.ops:tanh

or a ``[tool.backprop.impl]`` table in your pyproject.toml. Each op gets the tests
``backprop[<op>::<check>]`` for the checks in ``backprop.plugin.checks.CHECKS``; suite_power
first reruns the catalogue of known bugs on our reference kernels, in your environment, dtypes and
device, and fails the session if the suite misses one. Fixture: ``check_kernel``.

Installed through the ``pytest11`` entry point, so it loads in every pytest session of the
environment: it stays inert (no items, no imports beyond pytest) unless an implementation is named.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: the [tool.backprop] table needs tomli
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

PROFILES = ("ci", "dev", "thorough")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("backprop", "backprop: check your own kernels (docs/plugin.md)")
    group.addoption("--backprop-impl", action="append", default=[], metavar="OP=SPEC",
                    help="run backprop's suite on an implementation of OP: module[:attr][@contract|@autograd]"
                         " (repeatable; adds to [tool.backprop.impl])")
    group.addoption("--backprop-profile", choices=PROFILES, default=None,
                    help="hypothesis profile: ci (derandomised), dev (random), thorough (1000 examples); "
                         "default ci when CI is set, else dev")
    group.addoption("--backprop-max-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per property test (overrides the profile)")
    group.addoption("--backprop-xfails", default=None, metavar="FILE",
                    help="test ids expected to fail, one a line, a reason after '#'")
    group.addoption("--backprop-device", default=None, metavar="DEVICE", help="device of the cases (cpu)")
    group.addoption("--backprop-dtypes", default=None, metavar="DTYPES",
                    help="comma-separated float dtypes of the drawn cases, e.g. float32,bfloat16 "
                         "(default: the strategies' own, float64, float32, bfloat16, float16)")
    group.addoption("--backprop-mutants", action="append", default=[], metavar="SPEC",
                    help="module:attr of your own known bugs (a list of mutants), added to the catalogue")


def _tool_table(config: pytest.Config) -> tuple[dict, Path]:
    """[tool.backprop] of the project's pyproject.toml, and the folder its paths are relative to."""
    inipath = config.inipath
    path = config.rootpath / "pyproject.toml"
    if inipath is not None and inipath.name == "pyproject.toml":
        path = inipath
    if not path.is_file():
        return {}, Path.cwd()
    text = path.read_text(encoding="utf-8")
    if "[tool.backprop" not in text:
        return {}, path.parent
    if tomllib is None:
        raise pytest.UsageError(f"{path} has a [tool.backprop] table: reading it on Python 3.10 needs tomli")
    return tomllib.loads(text).get("tool", {}).get("backprop", {}), path.parent


def _option(config: pytest.Config, table: dict, name: str, default: Any = None) -> Any:
    given = config.getoption("backprop_" + name.replace("-", "_"))
    return given if given is not None else table.get(name, default)


def pytest_configure(config: pytest.Config) -> None:
    table, base = _tool_table(config)
    specs = dict(table.get("impl", {}))
    for given in config.getoption("backprop_impl"):
        name, sep, spec = given.partition("=")
        if not sep or not name or not spec:
            raise pytest.UsageError(f"--backprop-impl wants OP=module[:attr], got {given!r}")
        specs[name] = spec
    if specs:  # asked: only now import torch, hypothesis and the harness
        config.pluginmanager.register(BackpropRun(config, table, base, specs), "backprop-run")


def _xfails(path: Path) -> dict[str, str]:
    """array-api-tests' format: one test id a line, a reason after '#'; '#' lines are comments."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        test_id, _, reason = line.partition("#")
        if test_id.strip():
            found[test_id.strip()] = reason.strip() or f"listed in {path.name}"
    return found


class BackpropRun:
    """The plugin's state for one session: the implementations, their tests and the suite power."""

    def __init__(self, config: pytest.Config, table: dict, base: Path, specs: dict[str, str]) -> None:
        import torch

        from backprop.plugin import checks
        from backprop.plugin.implementations import load, resolve
        from backprop.testing.opinfo import OPS

        self.impls: dict[str, tuple[Any, str, str]] = {}
        for name, spec in specs.items():
            if name not in OPS:
                raise pytest.UsageError(f"backprop has no op {name!r}; it checks {', '.join(OPS)}")
            try:
                op, kind = load(name, spec)
            except (ImportError, AttributeError, TypeError, ValueError) as e:
                raise pytest.UsageError(f"backprop: cannot load {name}={spec}: {type(e).__name__}: {e}") from e
            self.impls[name] = (op, kind, spec)
        profile = _option(config, table, "profile") or ("ci" if os.environ.get("CI") else "dev")
        if profile not in checks.PROFILES:
            raise pytest.UsageError(f"backprop profile must be one of {PROFILES}, got {profile!r}")
        dtypes = _option(config, table, "dtypes") or ()
        if isinstance(dtypes, str):
            dtypes = [d for d in dtypes.split(",") if d.strip()]
        chosen = tuple(getattr(torch, d.strip().removeprefix("torch."), None) for d in dtypes)
        if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in chosen):
            raise pytest.UsageError(f"backprop dtypes must be torch float dtypes, got {dtypes!r}")
        mutants = list(config.getoption("backprop_mutants")) + list(table.get("mutants", []))
        extra = []
        for spec in mutants:
            found, _ = resolve(spec)
            extra += list(found) if isinstance(found, (list, tuple)) else [found]
        max_examples = _option(config, table, "max-examples")
        self.options = checks.Options(
            profile=profile, max_examples=None if max_examples is None else int(max_examples),
            dtypes=chosen, device=_option(config, table, "device", "cpu"), extra_mutants=tuple(extra),
        )
        xfails = config.getoption("backprop_xfails")
        path = Path(xfails) if xfails else (base / table["xfails"] if "xfails" in table else None)
        self.xfails = _xfails(path) if path is not None else {}
        self.power: dict[str, list] = {}  # op -> [(mutant, stage or None)], from the reports
        self.checks = checks

    def pytest_report_header(self) -> list[str]:
        from backprop.testing.strategies import FLOAT_DTYPES

        o = self.options
        impls = ", ".join(f"{n}={spec.partition('@')[0]} ({kind})" for n, (_, kind, spec) in self.impls.items())
        dtypes = ",".join(str(d).removeprefix("torch.") for d in o.dtypes or FLOAT_DTYPES)
        return [f"backprop: {impls}",
                f"backprop: profile {o.profile}, max_examples {o.max_examples or o.settings().max_examples}, "
                f"dtypes {dtypes}, device {o.device}"]

    @pytest.hookimpl(tryfirst=True)  # before -k and -m deselect, so that they apply to these items too
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        new = []
        for name, (op, _, _) in self.impls.items():
            for check in self.checks.CHECKS:
                test_id = f"backprop[{name}::{check}]"
                item = BackpropItem.from_parent(session, name=test_id, nodeid=test_id, op_name=name,
                                                check=check, op=op)
                if test_id in self.xfails:
                    if check == "suite_power":
                        raise pytest.UsageError(f"{test_id} cannot be xfailed: it is what makes a green "
                                                "run mean something")
                    item.add_marker(pytest.mark.xfail(reason=self.xfails[test_id], strict=False))
                new.append(item)
        unknown = sorted(set(self.xfails) - {i.nodeid for i in new})
        if unknown:
            warnings.warn(pytest.PytestWarning(f"backprop xfails name no generated test: {', '.join(unknown)}"),
                          stacklevel=1)
        items[:0] = new
        # counted in the "collected N items" line, as items that a collector found are
        session.config.hook.pytest_collectreport(
            report=pytest.CollectReport("backprop", "passed", None, result=new))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid.endswith("::suite_power]"):
            self.power.setdefault(report.nodeid, None)  # it ran; None until it reports its results
        for key, value in report.user_properties:
            if key == "backprop_suite_power":
                self.power[report.nodeid] = [tuple(v) for v in value]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if terminalreporter.config.option.collectonly:
            return
        ran = {n: self.power[f"backprop[{n}::suite_power]"] for n in self.impls
               if f"backprop[{n}::suite_power]" in self.power}
        not_run = [n for n in self.impls if n not in ran]  # deselected (-k, -m), or the session stopped first
        terminalreporter.write_sep("=", "backprop")
        if not ran:
            terminalreporter.write_line(f"suite power: not run for {', '.join(not_run)}")
            return
        results = [r for found in ran.values() if found is not None for r in found]
        caught = sum(stage is not None for _, stage in results)
        missed = [name for name, stage in results if stage is None]
        wanted = [n for n, found in ran.items() if found is None]  # ran, but ended before its results
        line = f"suite power: {caught} of {len(results)} known bugs caught"
        if missed:
            line += f"; MISSED: {', '.join(missed)} (the session fails)"
        if wanted:
            line += f"; not measured for {', '.join(wanted)}"
        if not_run:
            line += f"; not run for {', '.join(not_run)}"
        terminalreporter.write_line(line, red=bool(missed or wanted), green=not (missed or wanted), bold=True)


class PowerFailure(AssertionError):
    """The suite let a known bug through: its green runs prove less than they claim."""


class BackpropItem(pytest.Item):
    """One generated test: one check of one op's implementation."""

    def __init__(self, *, op_name: str, check: str, op: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.op_name, self.check, self.op = op_name, check, op

    def runtest(self) -> None:
        run: BackpropRun = self.config.pluginmanager.get_plugin("backprop-run")
        result = run.checks.RUN[self.check](self.op_name, self.op, run.options)
        if self.check == "suite_power":
            self.user_properties.append(("backprop_suite_power", [[n, s] for n, s, _ in result]))
            if any(stage is None for _, stage, _ in result):
                raise PowerFailure(f"the suite missed a known bug of {self.op_name}, run on backprop's "
                                   f"reference kernel:\n{run.checks.power_table(result)}")
            self.add_report_section("call", "suite power", run.checks.power_table(result))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        """The harness's own message (its table) and hypothesis's falsifying example, no traceback."""
        from backprop.testing import CheckFailure

        e = excinfo.value
        if isinstance(e, (CheckFailure, PowerFailure)):
            return "\n".join([str(e), *getattr(e, "__notes__", [])])
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, self.nodeid


@pytest.fixture(scope="session")
def check_kernel() -> Any:
    """check_kernel(impl, reference, *args, kind=None, seed=0, **options) -> Report: the harness's
    check_against_autograd for either kind of implementation. reference is a callable with the
    torch twin's signature, or an op name ("cross_entropy") for the op table's twin and floor."""
    from backprop.plugin.implementations import adapt
    from backprop.testing import check_against_autograd
    from backprop.testing.opinfo import OPS

    def check(impl: Any, reference: Any, *args: Any, kind: str | None = None, **options: Any) -> Any:
        magnitude = None
        if isinstance(reference, str):
            reference, magnitude = OPS[reference].reference, OPS[reference].magnitude
        op = adapt(impl, reference, getattr(impl, "__name__", repr(impl)), kind)
        return check_against_autograd(op, reference, *args, magnitude=magnitude, **options)

    return check
