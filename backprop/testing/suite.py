"""The suite's check of one drawn case, shared by the kernel tests and the mutant catalogue, so
that a mutant meets exactly the checks a real kernel does.

    check_case("batch_norm", backprop.batch_norm, case)     # oracle + jvp, second order, vmap
    check_case("tanh", backprop.tanh, case, checks=ALL_CHECKS)  # ... and opcheck (compiles)
    gradcheck_case("batch_norm", backprop.batch_norm, case) # finite differences, float64

``name`` picks the op's entry in the op table (``backprop.testing.opinfo``): its reference, its
rounding-floor magnitudes and how its cases are narrowed for finite differences. ``op`` is the
kernel under test: ``backprop.<name>``, its compiled twin, or a mutant. After the oracle (stages
forward, gradient, contract) come the drop-in stages of ``checks`` that apply to op
(``backprop.testing.stages``: jvp, second-order, vmap, opcheck).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from backprop.testing import stages
from backprop.testing.compare import Report
from backprop.testing.opinfo import OPS, Case
from backprop.testing.oracle import check_against_autograd, check_gradcheck

DEFAULT_CHECKS = stages.DEFAULT_CHECKS  # jvp, second-order, vmap
ALL_CHECKS = stages.STAGES  # and opcheck


def check_case(name: str, op: Any, case: Case, checks: Iterable[str] = DEFAULT_CHECKS) -> Report:
    """The oracle on the case, then the stages of ``checks`` that apply to op; raises
    CheckFailure naming the stage. ``checks=()``: the oracle alone."""
    args, options = case
    info = OPS[name]
    report = check_against_autograd(op, info.reference, *args, magnitude=info.magnitude, **options)
    report.extend(stages.run(name, op, info.reference, case, checks))
    return report


def gradcheck_case(name: str, op: Any, case: Case) -> bool:
    """Run gradcheck on the case; False where finite differences do not apply (the op table's
    ``gradcheck_inputs`` returned None)."""
    prepared = OPS[name].gradcheck_inputs(case)
    if prepared is None:
        return False
    args, options = prepared
    check_gradcheck(op, *args, **options)
    return True
