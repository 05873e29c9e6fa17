"""The verification harness itself: it must pass correct kernels and catch wrong ones."""

from types import SimpleNamespace

import pytest
import torch

from backprop import tanh
from backprop.autograd import apply
from backprop.testing import CheckFailure, check_against_autograd, check_gradcheck, compare


def kernel(forward, backward, name="k", no_grad=True):
    """A user's kernel; under torch.no_grad(), as the contract asks (no autograd history)."""
    if no_grad:
        forward, backward = torch.no_grad()(forward), torch.no_grad()(backward)
    return SimpleNamespace(forward=forward, backward=backward, __name__=name)


def sigmoid_forward(x):
    y = torch.sigmoid(x)
    return y, y  # a bare tensor cache is allowed


def sigmoid_backward(dout, y):
    return (dout * y * (1 - y),)


X = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))


def test_a_users_kernel_with_a_bare_tensor_cache_passes():
    report = check_against_autograd(kernel(sigmoid_forward, sigmoid_backward), torch.sigmoid, X)
    assert report.passed and [r.name for r in report] == ["out", "dx"]
    check_gradcheck(kernel(sigmoid_forward, sigmoid_backward), X.double())


@pytest.mark.parametrize(
    "forward, backward, stage, message",
    [
        (lambda x: (torch.sigmoid(x) * 1.001, torch.sigmoid(x)), sigmoid_backward, "forward", "disagrees with the reference"),
        (sigmoid_forward, lambda dout, y: (y * (1 - y),), "gradient", "disagrees with autograd"),  # ignores dout
        (sigmoid_forward, lambda dout, y: (dout * y * (1 - y), None), "contract", "tuple of 1 gradients"),
        (sigmoid_forward, lambda dout, y: dout * y * (1 - y), "contract", "tuple of 1 gradients"),
        (sigmoid_forward, lambda dout, y: ((dout * y * (1 - y)).double(),), "contract", "dx must match x"),
        (sigmoid_forward, lambda dout, y: (dout.mul_(y * (1 - y)),), "contract", "dout was modified"),
        (sigmoid_forward, lambda dout, y: (dout * y * (1 - y), y.add_(0.5))[:1], "contract", "cache field cache was modified"),
    ],
)
def test_wrong_kernels_are_caught_at_the_right_stage(forward, backward, stage, message):
    with pytest.raises(CheckFailure, match=message) as info:
        check_against_autograd(kernel(forward, backward), torch.sigmoid, X)
    assert info.value.stage == stage


def test_a_kernel_that_modifies_its_input_is_caught():
    def forward(x):
        y = torch.sigmoid(x)
        x.zero_()
        return y, y

    with pytest.raises(CheckFailure, match="x was modified") as info:
        check_against_autograd(kernel(forward, sigmoid_backward), torch.sigmoid, X.clone())
    assert info.value.stage == "contract"


def test_a_nondeterministic_backward_is_caught():
    calls = []

    def backward(dout, y):
        calls.append(1)
        return (dout * y * (1 - y) * (1 + 1e-7 * len(calls)),)

    with pytest.raises(CheckFailure, match="second backward on the same cache changed dx"):
        check_against_autograd(kernel(sigmoid_forward, backward), torch.sigmoid, X)


@pytest.mark.parametrize(
    "forward, message",
    [
        (lambda x: (torch.sigmoid(x).T, None), r"returned shape \(5, 6\), torch.float32, cpu; the reference returns \(6, 5\)"),
        (lambda x: (torch.sigmoid(x).double(), None), r"returned shape \(6, 5\), torch.float64, cpu; the reference returns \(6, 5\), torch.float32"),
        (lambda x: ([torch.sigmoid(x)], None), r"must return \(tensor, cache\), got list"),
    ],
)
def test_a_forward_of_the_wrong_shape_or_dtype_fails_at_the_forward_stage(forward, message):
    with pytest.raises(CheckFailure, match=message) as info:
        check_against_autograd(kernel(forward, sigmoid_backward), torch.sigmoid, X)
    assert info.value.stage == "forward"


def test_an_op_without_a_name_reports_the_real_failure():
    unnamed = SimpleNamespace(forward=lambda x: (torch.sigmoid(x) * 1.001, None), backward=sigmoid_backward)
    with pytest.raises(CheckFailure, match=r"namespace\(.*\)\.forward disagrees with the reference") as info:
        check_against_autograd(unnamed, torch.sigmoid, X)
    assert info.value.stage == "forward"


def test_a_second_backward_returning_a_shorter_tuple_is_caught():
    calls = []

    def backward(dout, y):
        calls.append(1)
        return (dout * y * (1 - y),) if len(calls) == 1 else ()

    with pytest.raises(CheckFailure, match="second backward on the same cache returned a tuple of length 0") as info:
        check_against_autograd(kernel(sigmoid_forward, backward), torch.sigmoid, X)
    assert info.value.stage == "contract"


@pytest.mark.parametrize(
    "backward, message",
    [
        # without torch.no_grad(), a dout that requires grad (a double-backward caller's) records history
        (sigmoid_backward, r"dx records autograd history \(dout requires grad\)"),
        (lambda dout, y: ((dout * y * (1 - y)).requires_grad_(),), r"dx records autograd history: "),
    ],
)
def test_gradients_that_record_autograd_history_are_caught(backward, message):
    with pytest.raises(CheckFailure, match=message) as info:
        check_against_autograd(kernel(sigmoid_forward, backward, no_grad=False), torch.sigmoid, X)
    assert info.value.stage == "contract"


def test_a_nondeterministic_forward_is_caught():
    calls = []

    def forward(x):
        calls.append(1)
        y = torch.sigmoid(x) * (1 + 1e-6 * (len(calls) - 1))  # exact the first time only
        return y, y

    with pytest.raises(CheckFailure, match="second forward on the same inputs changed out") as info:
        check_against_autograd(kernel(forward, sigmoid_backward), torch.sigmoid, X)
    assert info.value.stage == "forward"


def test_the_table_puts_the_verdict_first_and_labels_the_same_dtype_comparison():
    text = str(check_against_autograd(kernel(sigmoid_forward, sigmoid_backward), torch.sigmoid, X))
    header = next(line for line in text.splitlines() if line.startswith("verdict  "))
    assert header.split()[:2] == ["verdict", "tensor"]
    assert "| vs torch, same dtype: bitwise" in header and "approx" not in header and " ok" not in header
    rows = [line.split() for line in text.splitlines()[-2:]]
    assert [row[:2] for row in rows] == [["ok", "out"], ["ok", "dx"]]


def test_gradcheck_catches_a_wrong_formula_independently_of_autograd():
    wrong = kernel(sigmoid_forward, lambda dout, y: (dout * y * (1 + y),))
    with pytest.raises(CheckFailure) as info:
        check_gradcheck(wrong, X.double())
    assert info.value.stage == "gradcheck"


def test_failure_message_names_tensor_element_and_values():
    wrong = kernel(tanh.forward, lambda dout, c: (dout * (1 + c.out * c.out),))
    with pytest.raises(CheckFailure) as info:
        check_against_autograd(wrong, torch.tanh, X)
    text = str(info.value)
    assert "dx" in text and "FAIL" in text and "worst at" in text and "float64" in text


def test_compare_record():
    ref = torch.tensor([1.0, -2.0, float("nan")], dtype=torch.float64)
    same = compare("t", ref.float(), ref.float(), ref)
    assert same.exact and same.approximate and same.passed and same.error_ratio <= 1
    off = compare("t", torch.tensor([1.0, -2.5, float("nan")]), ref.float(), ref)
    assert not off.exact and not off.passed and off.worst_index == (1,) and off.max_abs_diff == 0.5
    nan_where_finite = compare("t", torch.tensor([float("nan"), -2.0, float("nan")]), ref.float(), ref)
    assert not nan_where_finite.passed and nan_where_finite.our_error == float("inf")


def test_float64_uses_direct_tolerances():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert compare("t", ref + 1e-9, ref, ref).passed
    assert not compare("t", ref + 1e-5, ref, ref).passed


def test_adapter_passes_the_kernel_gradient_through_autograd():
    x = X.clone().requires_grad_()
    y = apply(tanh, x)
    dout = torch.randn_like(y)
    y.backward(dout)
    _, cache = tanh.forward(X)
    assert torch.equal(x.grad, tanh.backward(dout, cache)[0])


def test_to_device_moves_tensor_options_too():
    """The CUDA tests draw on the CPU and move the case: class weights and running statistics are
    options, and left on the CPU they made every weighted case a device mismatch on a GPU."""
    from backprop.testing.strategies import to_device

    logits, targets, weight = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.rand(4)
    (m_logits, m_targets), options = to_device(((logits, targets), {"weight": weight, "reduction": "sum"}), "meta")
    assert m_logits.is_meta and m_targets.is_meta and options["weight"].is_meta
    assert options["reduction"] == "sum" and weight.device.type == "cpu"  # the caller's tensors stay
