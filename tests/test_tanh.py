import pytest
import torch
from hypothesis import example, given

from backprop import tanh
from backprop.testing import check_against_autograd, references
from backprop.testing.strategies import tanh_cases, to_device
from backprop.testing.suite import check_case, gradcheck_case


@given(case=tanh_cases())
# 1 - y*y loses ~5 bits to cancellation near |y| = 1 (error 8x torch's); (1 - y)(1 + y) does not
@example(case=((torch.tensor(2.5940),), {}))
def test_matches_autograd(device, case):
    check_case("tanh", tanh, to_device(case, device))


@given(case=tanh_cases(dtype=torch.float64))
def test_gradcheck(case):
    gradcheck_case("tanh", tanh, case)



def test_cache_holds_the_output_only():
    x = torch.randn(5)
    out, cache = tanh.forward(x)
    assert cache._fields == ("out", "versions") and cache.out is out


def test_saturated_inputs_have_zero_gradient(device):
    x = torch.tensor([-1e4, -30.0, 30.0, 1e4], device=device)
    check_against_autograd(tanh, references.tanh, x)


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.arange(3), TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
        (3.0, TypeError, r"x must be a torch.Tensor, got float"),
    ],
)
def test_bad_input(x, error, message):
    with pytest.raises(error, match=message):
        tanh.forward(x)


def test_bad_dout():
    _, cache = tanh.forward(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(2, 3\), got \(3, 2\)"):
        tanh.backward(torch.ones(3, 2), cache)
