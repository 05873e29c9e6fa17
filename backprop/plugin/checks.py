"""The checks behind the plugin's generated tests, one function per check name: each runs the
suite's own harness (backprop.testing) on one op's implementation.

    run("cross_entropy", "gradient_vs_float64", op, Options(max_examples=40, ...))

Test ids are ``backprop[<op>::<check>]``; CHECKS lists them in the order they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

# the module, not its functions: each check looks check_case up when it runs, so a test that patches the
# oracle for one session (tests/test_plugin.py) cannot leave a later session holding the patched one
from backprop.testing import suite
from backprop.testing.compare import Report
from backprop.testing.fuzz import bad_cases, check_bad_input
from backprop.testing.mutants import MUTANTS, first_catch
from backprop.testing.opinfo import OPS
from backprop.testing.oracle import random_dout
from backprop.testing.strategies import Case, to_device, to_dtype
from backprop.testing.strategies import noncontiguous as strided  # the check below is named noncontiguous

# suite_power first: a green run is trusted only once the suite has caught the known bugs here
CHECKS = ("suite_power", "fixed_cases", "gradient_vs_float64", "gradcheck", "noncontiguous", "bad_inputs")
PROFILES = {  # the repository's conftest.py profiles, as hypothesis settings
    "ci": dict(derandomize=True, max_examples=40, database=None),
    "dev": dict(max_examples=40),
    "thorough": dict(max_examples=1000),
}
# per mutant at most: the run's own max_examples, capped here; the catalogue's bugs fall within 20
POWER_EXAMPLES = 100


@dataclass(frozen=True)
class Options:
    profile: str = "dev"
    max_examples: int | None = None
    dtypes: tuple[torch.dtype, ...] = ()  # (): the strategies' own (strategies.FLOAT_DTYPES)
    device: str = "cpu"
    extra_mutants: tuple[Any, ...] = field(default=())  # the user's own known bugs, each with .op

    def settings(self) -> settings:
        chosen = dict(PROFILES[self.profile])
        if self.max_examples is not None:
            chosen["max_examples"] = self.max_examples
        # no explain phase: its list of lines run only by failing examples points into torch
        return settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True,
                        phases=[p for p in Phase if p != Phase.explain], **chosen)

    def cases(self, name: str) -> st.SearchStrategy[Case]:
        info = OPS[name]
        if not self.dtypes:
            return info.cases()
        return st.sampled_from(self.dtypes).flatmap(info.cases)


def _property(name: str, check: str, options: Options, strategy: st.SearchStrategy,
              body: Callable[[Case], None]) -> None:
    """Run body on cases drawn from strategy under the profile's settings."""

    def search(case: Case) -> None:
        body(case)

    # each (op, check) its own key in hypothesis's example database (one inner function serves all)
    search._hypothesis_internal_add_digest = f"backprop[{name}::{check}]".encode()
    options.settings()(given(case=strategy)(search))()


def fixed_cases(name: str, op: Any, options: Options) -> list[Report]:
    """The op table's seeded cases (notebook scale first), in each requested dtype."""
    reports = []
    for args, kw in OPS[name].fixed_cases(options.device):
        for dtype in options.dtypes or (None,):
            reports.append(suite.check_case(name, op, to_dtype((args, kw), dtype)))
    return reports


def gradient_vs_float64(name: str, op: Any, options: Options) -> None:
    """Forward, every gradient and the contract against autograd in the test dtype and float64."""
    _property(name, "gradient_vs_float64", options, options.cases(name),
              lambda case: suite.check_case(name, op, to_device(case, options.device)))


def gradcheck(name: str, op: Any, options: Options) -> None:
    """Finite differences in float64, independent of any formula."""
    _property(name, "gradcheck", options, OPS[name].cases(dtype=torch.float64),
              lambda case: assume(suite.gradcheck_case(name, op, to_device(case, options.device))))


def noncontiguous(name: str, op: Any, options: Options) -> None:
    """Strided inputs and dout give the results of contiguous ones (float64 tolerances: a strided
    reduction may sum in another order)."""

    def body(case: Case) -> None:
        args, kw = to_device(case, options.device)
        out, cache = op.forward(*args, **kw)
        dout = random_dout(out.shape, out.dtype, out.device, seed=0)
        grads = op.backward(dout, cache)
        out_nc, cache_nc = op.forward(*[strided(a) for a in args], **kw)
        grads_nc = op.backward(strided(dout), cache_nc)
        torch.testing.assert_close(out_nc, out, equal_nan=True, msg=lambda m: f"out, strided inputs: {m}")
        for i, (g, g_nc) in enumerate(zip(grads, grads_nc)):
            if g is not None:
                torch.testing.assert_close(g_nc, g, equal_nan=True,
                                           msg=lambda m, i=i: f"gradient {i}, strided inputs: {m}")

    _property(name, "noncontiguous", options, OPS[name].cases(dtype=torch.float64), body)


def bad_inputs(name: str, op: Any, options: Options) -> None:
    """Invalid inputs: a ValueError/TypeError that says what was wrong, or torch's own result."""
    _property(name, "bad_inputs", options, bad_cases(name),
              lambda case: check_bad_input(name, op, to_device(case, options.device)))


def suite_power(name: str, op: Any, options: Options) -> list[tuple[str, str | None, str]]:
    """The known bugs of this op (the catalogue, plus the user's) run against the same checks, on
    our reference kernels, with no more examples than this run draws: (mutant, stage that caught
    it or None, the bug). A run too small to catch them fails here. op is not used."""
    found = [m for m in (*MUTANTS, *options.extra_mutants) if m.op == name]
    examples = min(options.settings().max_examples, POWER_EXAMPLES)
    return [(m.__name__, first_catch(m, max_examples=examples, dtypes=options.dtypes,
                                     device=options.device, fixed=True), (m.__doc__ or "").strip())
            for m in found]


def power_table(results: list[tuple[str, str | None, str]]) -> str:
    width = max((len(n) for n, _, _ in results), default=0)
    return "\n".join(f"  {'caught by ' + s if s else 'MISSED':18s} {n.ljust(width)}  {doc}"
                     for n, s, doc in results)


RUN = {check: globals()[check] for check in CHECKS}
