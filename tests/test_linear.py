import pytest
import torch
from hypothesis import example, given

from backprop import linear
from backprop.testing import check_against_autograd, references
from backprop.testing.strategies import linear_cases, to_device
from backprop.testing.suite import check_case, gradcheck_case


@given(case=linear_cases())
# a one-entry dx = dout @ W that cancels: both errors are within float32's bound for the terms'
# size and their ratio is luck (17x here), so the floor scales with |dout||W|
@example(case=((torch.tensor([0.0154099613]), torch.tensor(
    [[1.6137037277], [1.3412560225], [-0.3296316564], [-0.3668318689], [-1.4708263874], [-1.1741183996],
     [-1.2145366669], [0.7026074529], [-2.6359107494], [1.2697880268], [0.1206937954], [0.5135682225],
     [-1.4384102821], [1.3794118166], [-0.5360781550], [-0.4230327010]]), None), {}))
def test_matches_autograd(device, case):
    check_case("linear", linear, to_device(case, device))


@given(case=linear_cases(dtype=torch.float64))
def test_gradcheck(case):
    gradcheck_case("linear", linear, case)



def test_square_weight_gradient_is_not_transposed():
    # a square, non-symmetric weight catches a missing transpose that shapes cannot
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    check_against_autograd(linear, references.linear, x, w, torch.randn(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "x, weight, bias, error, message",
    [
        (torch.randn(2, 5), torch.randn(3, 4), None, ValueError, r"x must have D=4 features .* got shape \(2, 5\)"),
        (torch.randn(2, 3), torch.randn(3, 4), None, ValueError, r"x must have D=4 features .* got shape \(2, 3\)"),
        (torch.randn(2, 4), torch.randn(4), None, ValueError, r"weight must be 2-D \(H, D\), got 1-D"),
        (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), ValueError, r"bias must have shape \(3,\) .*got \(4,\)"),
        (torch.tensor(1.0), torch.randn(3, 1), None, ValueError, r"x must be at least 1-D"),
        (torch.randn(2, 4).double(), torch.randn(3, 4), None, TypeError, r"weight must have the dtype of x \(torch.float64\), got torch.float32"),
        (torch.ones(2, 4, dtype=torch.int64), torch.randn(3, 4), None, TypeError, r"x must be a floating-point tensor"),
    ],
)
def test_bad_input(x, weight, bias, error, message):
    with pytest.raises(error, match=message):
        linear.forward(x, weight, bias)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match=r"one device, got x on cuda:0, weight on cpu"):
        linear.forward(torch.randn(2, 4, device="cuda"), torch.randn(3, 4))


@pytest.mark.parametrize("x_shape, w_shape", [((0,), (0, 0)), ((2, 0), (3, 0)), ((0, 4), (3, 4)), ((2, 4), (0, 4))])
def test_empty_dimensions_like_torch(x_shape, w_shape):
    """Found by the fuzz test: reshape(-1, D) is ambiguous when D = 0; the row count is explicit now."""
    check_against_autograd(linear, references.linear, torch.randn(x_shape), torch.randn(w_shape))


def test_many_features_are_not_compared_by_identity():
    """D = 300 (ints above 256 are distinct objects in CPython): `x.shape[-1] is not D` would
    pass every test drawn with small D."""
    x, weight = torch.randn(2, 300, dtype=torch.float64), torch.randn(3, 300, dtype=torch.float64)
    out, cache = linear.forward(x, weight)
    torch.testing.assert_close(out, x @ weight.T)
