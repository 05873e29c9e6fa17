import pytest
import torch
from hypothesis import given

from backprop import logsumexp
from backprop.testing import check_against_autograd, references
from backprop.testing.strategies import logsumexp_cases, to_device
from backprop.testing.suite import check_case, gradcheck_case


@given(case=logsumexp_cases())
def test_matches_autograd(device, case):
    check_case("logsumexp", logsumexp, to_device(case, device))


@given(case=logsumexp_cases(dtype=torch.float64))
def test_gradcheck(case):
    gradcheck_case("logsumexp", logsumexp, case)



def test_large_shift_and_neg_inf_entries(device):
    x = torch.tensor([[1e4, 1e4 - 1, -torch.inf], [-1e4, -torch.inf, -1e4 + 2]], device=device)
    out, _ = logsumexp.forward(x)
    assert torch.isfinite(out).all()
    check_against_autograd(logsumexp, references.logsumexp, x)


def test_rows_of_inf_propagate_like_torch(device):
    x = torch.tensor([[-torch.inf, -torch.inf], [torch.inf, 0.0], [torch.nan, 1.0]], device=device)
    check_against_autograd(logsumexp, references.logsumexp, x, dim=1)


def inf_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows holding +inf beside finite entries above log(max) (where exp overflows: ~709.8 in
    float64, ~88.7 in float32, ~11.1 in float16), -inf, the dtype's largest finite value, and one
    holding +inf and nan; a finite row last."""
    inf, nan, big = torch.inf, torch.nan, torch.finfo(dtype).max
    return torch.tensor([[inf, 710.0, 1.0, 0.0], [12.0, inf, -inf, 100.0], [inf, inf, 1e4, -5.0],
                         [inf, big, -big, 89.0], [inf, nan, 710.0, 1.0], [1.0, 2.0, 3.0, 4.0]], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_row_holding_inf_and_large_finite_entries_as_torch(dtype, device):
    """torch's out is +inf for a row holding +inf (and no nan), its gradient dout * exp(x - out): 0 at
    every finite entry, however large, nan at the +inf ones; forward mode nan, as torch.func.jvp."""
    x = inf_rows(dtype).to(device)
    check_against_autograd(logsumexp, references.logsumexp, x, dim=1)
    out, cache = logsumexp.forward(x, dim=1)
    dx = logsumexp.backward(torch.ones_like(out), cache)[0]
    x_ = x.detach().requires_grad_()
    want = torch.autograd.grad(torch.logsumexp(x_, 1).sum(), x_)[0]
    # the rows holding +inf or nan exactly (the finite row last: the oracle's rounding rule above)
    torch.testing.assert_close(out[:5], torch.logsumexp(x, 1)[:5], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(dx[:5], want[:5], equal_nan=True, rtol=0, atol=0)
    assert dx[0].tolist()[1:] == [0.0, 0.0, 0.0] and dx[0, 0].isnan()  # the fault hunt's row
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x)
    want = torch.func.jvp(lambda x: torch.logsumexp(x, 1), (x,), (t,))[1]
    torch.testing.assert_close(logsumexp.jvp((t,), cache), want, equal_nan=True)


def test_backward_uses_the_exact_shift_not_the_rounded_output():
    # In bfloat16 a rounded output of ~1.55e4 is off by up to 32; exp(x - out) is then far off.
    # Shifted coordinates keep our gradient accurate where torch's own is not.
    x = (torch.randn(64, 100, dtype=torch.float64) + 1.55e4).bfloat16()
    report = check_against_autograd(logsumexp, references.logsumexp, x, dim=0)
    dx = report[1]
    assert dx.our_error < 1e-2 * dx.torch_error, str(report)


@pytest.mark.parametrize(
    "x, options, error, message",
    [
        (torch.randn(3, 4), {"dim": 2}, ValueError, r"dim must lie in \[-2, 1\] for a 2-D input, got 2"),
        (torch.randn(3, 4), {"dim": (0, 0)}, ValueError, r"dim must not repeat a dimension, got \(0, 0\)"),
        (torch.randn(3, 4), {"dim": 1.0}, TypeError, r"dim must be an int or a non-empty tuple of ints, got 1.0"),
        (torch.randn(3, 4), {"dim": ()}, TypeError, r"dim must be an int or a non-empty tuple of ints, got \(\)"),
        (torch.arange(4), {}, TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
        ([1.0, 2.0], {}, TypeError, r"x must be a torch.Tensor, got list"),
    ],
)
def test_bad_input(x, options, error, message):
    with pytest.raises(error, match=message):
        logsumexp.forward(x, **options)


@pytest.mark.parametrize("shape, dim", [((3, 0), 1), ((3, 0), (0, 1)), ((0, 3), 0), ((2, 0, 4), (1, 2)), ((0,), 0)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_an_empty_dim_gives_minus_inf_and_an_empty_gradient_as_torch(shape, dim, keepdim):
    """log(sum over nothing) = log(0) = -inf; dx is as empty as x. Forward mode: 0 / 0 = nan, as torch."""
    x = torch.randn(shape, dtype=torch.float64)
    check_against_autograd(logsumexp, references.logsumexp, x, dim=dim, keepdim=keepdim)
    out, cache = logsumexp.forward(x, dim=dim, keepdim=keepdim)
    assert (out == -torch.inf).all()
    t = torch.randn_like(x)
    want = torch.func.jvp(lambda x: torch.logsumexp(x, dim, keepdim), (x,), (t,))[1]
    torch.testing.assert_close(logsumexp.jvp((t,), cache), want, equal_nan=True)


def test_bad_dout():
    _, cache = logsumexp.forward(torch.randn(3, 4), dim=0, keepdim=True)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(1, 4\), got \(4,\)"):
        logsumexp.backward(torch.ones(4), cache)
