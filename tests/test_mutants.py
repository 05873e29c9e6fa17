"""The suite proves its power: every plausible bug in tests/mutants.py must be caught by the
same oracle, gradcheck and hypothesis strategies that the kernel tests use."""

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from mutants import MUTANTS

from backprop.testing import CheckFailure
from backprop.testing.strategies import CASES
from backprop.testing.suite import check_case, gradcheck_case


def first_catch(m) -> str | None:
    """Run the suite's checks on the mutant; return the stage that caught it, None if it survived."""
    strategy = CASES[m.op]()
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
        except Exception as e:  # a crash is caught too, e.g. shapes that do not line up
            caught.append(f"error ({type(e).__name__})")
            raise

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
