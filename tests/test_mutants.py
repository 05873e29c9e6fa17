"""The suite proves its power: every plausible bug in tests/mutants.py must be caught by the
same oracle, gradcheck and hypothesis strategies that the kernel tests use."""

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from mutants import MUTANTS

from backprop.testing import CheckFailure
from backprop.testing.opinfo import OPS
from backprop.testing.suite import check_case, gradcheck_case


def first_catch(m) -> str | None:
    """Run the suite's checks on the mutant; return the stage that caught it (forward, gradient,
    gradcheck or contract), None if it survived. A crash does not count as a catch: a mutant that
    only crashes (say, on shapes that do not line up) must still be caught by a check on the cases
    where it runs, so a broken mutant cannot pass for a caught one."""
    strategy = OPS[m.op].cases()
    if hasattr(m, "cases"):
        strategy = m.cases(strategy)
    caught = []

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def search(case):
        try:
            check_case(m.op, m, case)
            gradcheck_case(m.op, m, case)
        except CheckFailure as e:
            caught.append(e.stage)
            raise
        except Exception:  # e.g. a missing transpose on non-square weights: try the next case
            pass

    try:
        search()
    except Exception:
        return caught[0]
    return None


@pytest.mark.parametrize("m", MUTANTS, ids=[m.__name__ for m in MUTANTS])
def test_mutant_is_caught(m):
    stage = first_catch(m)
    assert stage is not None, f"mutant survived: {m.__doc__}"
    print(f"{m.__name__}: caught by {stage}")
