"""Fuzzed invalid inputs for every kernel (backprop.testing.fuzz): the only outcomes allowed are a
ValueError/TypeError from our checks, or a result that agrees with torch's own (NaN propagating as
in torch). Never a crash from deep inside torch, and never numbers where torch refuses."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import backprop
from backprop.testing.fuzz import bad_cases, check_bad_input


@pytest.mark.parametrize("name", list(backprop.OPS))
@given(data=st.data())
def test_bad_inputs_fail_cleanly_or_match_torch(name, data):
    check_bad_input(name, backprop.OPS[name], data.draw(bad_cases(name), label="case"))
