"""The suite proves its power: every plausible bug in backprop/testing/mutants/ must be caught by
the same oracle, gradcheck and hypothesis strategies that the kernel tests use."""

import pytest

from backprop.testing.mutants import MUTANTS, first_catch


@pytest.mark.parametrize("m", MUTANTS, ids=[m.__name__ for m in MUTANTS])
def test_mutant_is_caught(m):
    stage = first_catch(m, max_examples=300)
    assert stage is not None, f"mutant survived: {m.__doc__}"
    print(f"{m.__name__}: caught by {stage}")
